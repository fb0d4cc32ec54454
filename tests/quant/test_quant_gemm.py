"""The quantized GEMM kernel (W4A16, W8A16, FP8-weight A16, W4A8, block-FP8 W8A8) and the FP8 activation
quantization under the interpreter, against the plain-torch references, on fresh random inputs."""

import random

import pytest
import torch

pytest.importorskip("triton")

from slimserve.kernels.fp8_quant import quantize_fp8_triton  # noqa: E402
from slimserve.kernels.fp8_quant_ref import quantize_fp8_ref  # noqa: E402
from slimserve.kernels.quant_gemm import FMA_GEMV_MAX_M, quant_gemm_triton  # noqa: E402
from slimserve.kernels.quant_gemm_ref import QuantWeight, pack_codes, quant_gemm_ref, unpack_codes  # noqa: E402


def generator() -> tuple[torch.Generator, int]:
    seed = random.randrange(2**31)
    return torch.Generator().manual_seed(seed), seed


def int_weight(n: int, k: int, bits: int, group: int | None, zeros: bool, gen: torch.Generator) -> QuantWeight:
    group = group or k
    groups = -(-k // group)
    codes = torch.randint(0, 1 << bits, (n, k), generator=gen)
    scales = torch.rand(n, groups, generator=gen) * 0.02 + 0.001
    z = torch.randint(0, 1 << bits, (n, groups), generator=gen).float() if zeros else None
    return QuantWeight(pack_codes(codes, bits), scales, z, bits, group, k, n)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def test_pack_roundtrip():
    gen, _ = generator()
    for bits in (2, 4, 8):
        codes = torch.randint(0, 1 << bits, (5, 37), generator=gen)
        assert torch.equal(unpack_codes(pack_codes(codes, bits), bits, 37), codes)


# (M, N, K): decode-sized (GEMV path, split K) and prefill-sized (GEMM path), odd sizes included.
SHAPES = [(1, 72, 256), (3, 40, 384), (16, 33, 128), (17, 96, 256), (40, 130, 192)]


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("group", [32, 64, 128, None])
@pytest.mark.parametrize("zeros", [False, True])
def test_a16_matches_reference(bits, group, zeros):
    gen, seed = generator()
    for m, n, k in SHAPES:
        if group is not None and k % group:
            continue
        w = int_weight(n, k, bits, group, zeros, gen)
        x = torch.randn(m, k, generator=gen)
        err = rel_err(quant_gemm_triton(x, w), quant_gemm_ref(x, w))
        # A few rows take the CUDA-core GEMV, whose 2- and 4-bit codes keep about 1e-4 (test_int_gemv.py).
        tol = 5e-4 if m <= FMA_GEMV_MAX_M[bits] else 1e-5
        assert err < tol, f"seed {seed}, shape {(m, n, k)}: {err}"


def test_a16_channel_scales_odd_k_and_forced_split():
    gen, seed = generator()
    w = int_weight(50, 200, 4, None, True, gen)  # K not a multiple of the tile: masked tail
    x = torch.randn(5, 200, generator=gen)
    for split in (1, 2, 3):
        err = rel_err(quant_gemm_triton(x, w, split_k=split, block_k=64), quant_gemm_ref(x, w))
        assert err < 1e-5, f"seed {seed}, split {split}: {err}"


def test_a16_bf16_activations():
    gen, seed = generator()
    w = int_weight(64, 256, 4, 64, False, gen)
    w.scales = w.scales.bfloat16()
    x = torch.randn(20, 256, generator=gen).bfloat16()
    err = rel_err(quant_gemm_triton(x, w), quant_gemm_ref(x, w))
    assert err < 1e-2, f"seed {seed}: {err}"


def fp8_weight(n: int, k: int, block: tuple[int, int], gen: torch.Generator) -> QuantWeight:
    wq = (torch.randn(n, k, generator=gen) * 64).clamp(-448, 448).to(torch.float8_e4m3fn)
    bn, bk = block
    scales = torch.rand(-(-n // bn), -(-k // bk), generator=gen) * 1e-3
    return QuantWeight(wq, scales, None, 8, bk, k, n, block_n=bn)


@pytest.mark.parametrize("m", [1, 7, 33])
def test_fp8_block_weights(m):
    gen, seed = generator()
    w = fp8_weight(130, 256, (128, 128), gen)
    x = torch.randn(m, 256, generator=gen)
    assert rel_err(quant_gemm_triton(x, w), quant_gemm_ref(x, w)) < 1e-5, f"seed {seed}"
    xq, xs = quantize_fp8_ref(x, 128)
    err = rel_err(quant_gemm_triton(xq, w, xs, torch.float32), quant_gemm_ref(xq, w, xs, torch.float32))
    assert err < 1e-5, f"seed {seed}: {err}"


@pytest.mark.parametrize("group", [32, 64, 128])
@pytest.mark.parametrize("m", [1, 5, 24])
def test_w4a8(group, m):
    gen, seed = generator()
    w = int_weight(72, 256, 4, group, False, gen)
    xq, xs = quantize_fp8_ref(torch.randn(m, 256, generator=gen) * 3)
    err = rel_err(quant_gemm_triton(xq, w, xs, torch.float32), quant_gemm_ref(xq, w, xs, torch.float32))
    assert err < 1e-5, f"seed {seed}: {err}"


@pytest.mark.parametrize("group", [None, 32, 128])
def test_fp8_activation_quantization(group):
    gen, seed = generator()
    x = torch.randn(9, 384, generator=gen) * torch.rand(9, 1, generator=gen) * 10
    x[4] = 0  # an all-zero row keeps a positive scale
    q, s = quantize_fp8_triton(x, group)
    rq, rs = quantize_fp8_ref(x, group)
    assert torch.allclose(s, rs, rtol=1e-6, atol=0), f"seed {seed}"
    assert torch.equal(q.float(), rq.float()), f"seed {seed}"
    # Dequantized, within half an E4M3 step of the input: 2**-4 relative, 2**-10 of the scale among subnormals.
    full = rs.repeat_interleave(384 // rs.shape[1], 1)
    assert ((rq.float() * full - x).abs() <= x.abs() * 2**-4 + full * 2**-10).all(), f"seed {seed}"


def test_fp8_static_scale():
    gen, seed = generator()
    x = torch.randn(6, 100, generator=gen) * 4
    static = torch.tensor([0.02])
    q, s = quantize_fp8_triton(x, static_scale=static)
    rq, rs = quantize_fp8_ref(x, static_scale=static)
    assert torch.equal(q.float(), rq.float()) and torch.equal(s, rs), f"seed {seed}"
    assert q.float().abs().max() <= 448
