"""The decode GEMV for integer weights (int_gemv_triton) under the interpreter, against the plain-torch reference on
fresh random inputs: odd sizes, group sizes 32/64/128 and per channel, zero points, split K, both weight layouts,
FP8 activations, and act-order weights as a GPTQ layer holds them."""

import pytest
import torch

pytest.importorskip("triton")

from slimserve.kernels.fp8_quant_ref import quantize_fp8_ref  # noqa: E402
from slimserve.kernels.quant_gemm import (  # noqa: E402
    GemvConfig,
    int_gemv_norm_triton,
    int_gemv_triton,
    quant_gemm_triton,
)
from slimserve.kernels.quant_gemm_ref import NormIn, NormOut, int_gemv_norm_ref, pack_codes, quant_gemm_ref  # noqa: E402
from tests.quant.test_layers import SHARDS, K, build  # noqa: E402
from tests.quant.test_quant_gemm import generator, int_weight, rel_err  # noqa: E402

# Codes offset by 2**12 (2-bit and 4-bit) with fp32 activations: the sums keep about 1e-4 (bf16 rounds at 4e-3).
TOL = 5e-4
# (M, N, K, group, config): one K tile per group or several groups per tile, a K tail, split K into 1-3 slices.
CASES = [
    (1, 72, 256, 128, GemvConfig(block_n=32, block_k=64, split_k=3)),
    (3, 40, 384, 32, GemvConfig(block_n=16, block_k=128, split_k=2)),
    (2, 33, 192, 64, GemvConfig(block_n=32, block_k=64, split_k=1, prefetch=False)),
    (1, 50, 200, None, GemvConfig(block_n=16, block_k=64, split_k=2)),
    # Software-pipelined K loops (tiles copied ahead through shared memory): a K tail, split K or not.
    (2, 40, 320, 64, GemvConfig(block_n=32, block_k=64, split_k=2, num_stages=3)),
    (1, 24, 200, None, GemvConfig(block_n=16, block_k=64, split_k=1, num_stages=2)),
]


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("case", range(len(CASES)))
def test_int_gemv_matches_reference(bits, case):
    gen, seed = generator()
    m, n, k, group, config = CASES[case]
    zeros = case % 2 == 1
    w = int_weight(n, k, bits, group, zeros, gen)
    x = torch.randn(m, k, generator=gen)
    for layout in (w, w.input_major()):
        out = int_gemv_triton(x, layout, config=config)
        assert rel_err(out, quant_gemm_ref(x, layout)) < TOL, f"seed {seed}"
    assert not layout.counters.any(), "the split-K counters must be left at zero for the next launch"


def test_fp8_activations_per_token():
    gen, seed = generator()
    w = int_weight(40, 256, 4, 64, False, gen).input_major()
    xq, xs = quantize_fp8_ref(torch.randn(3, 256, generator=gen) * 3)
    out = int_gemv_triton(xq, w, xs, torch.float32, GemvConfig(block_n=16, block_k=64, split_k=2))
    assert rel_err(out, quant_gemm_ref(xq, w, xs, torch.float32)) < TOL, f"seed {seed}"


def test_routing_by_token_count():
    """A few tokens take the GEMV, more take the tensor-core kernel; both read input-major weights."""
    gen, seed = generator()
    w = int_weight(48, 128, 4, 32, True, gen).input_major()
    for m in (1, 20):
        x = torch.randn(m, 128, generator=gen)
        assert rel_err(quant_gemm_triton(x, w), quant_gemm_ref(x, w)) < TOL, f"seed {seed}, m {m}"


def test_act_order_gptq_layer():
    """GPTQ with desc_act: the layer permutes the input, the GEMV reads the regrouped codes."""
    k, g = K, 64
    g_idx = (torch.randperm(k) // g).int()
    parts, dense = [], []
    for rows in SHARDS:
        codes = torch.randint(0, 16, (k, rows))
        zeros = torch.randint(0, 15, (k // g, rows))
        scales = torch.rand(k // g, rows) * 0.01 + 0.001
        parts.append({"qweight": pack_codes(codes.t(), 4).t().contiguous(), "qzeros": pack_codes(zeros, 4),
                      "scales": scales, "g_idx": g_idx})  # fmt: skip
        dense.append(((codes - (zeros + 1)[g_idx.long()]) * scales[g_idx.long()]).t())
    quant = {"quant_method": "gptq", "bits": 4, "group_size": g, "desc_act": True, "sym": False}
    layer = build(quant, parts)
    x = torch.randn(2, k)
    out = int_gemv_triton(x[:, layer.perm], layer.qweight, config=GemvConfig(block_n=16, block_k=64, split_k=2))
    want = x @ torch.cat(dense).t()
    assert rel_err(out, want) < TOL


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_bf16_activations_four_to_a_load(bits):
    """bf16 rows are read as 64-bit words: a K tail inside the last word, and a row stride that forbids it."""
    gen, seed = generator()
    for m, n, k, group, config in (CASES[0], CASES[3]):
        w = int_weight(n, k, bits, group, False, gen).input_major()
        x = torch.randn(m, k + 2, generator=gen).bfloat16()
        for rows in (x[:, :k].contiguous(), x[:, :k]):  # the second: a stride of k + 2 takes the plain loads
            out = int_gemv_triton(rows, w, out_dtype=torch.float32, config=config)
            assert rel_err(out, quant_gemm_ref(rows, w, None, torch.float32)) < TOL, f"seed {seed}"


@pytest.mark.parametrize("case,dtype", [(0, torch.float32), (1, torch.float32), (3, torch.bfloat16)])
def test_norm_halves_in_the_epilogue(case, dtype):
    """NormIn scales the outputs by the 1 / rms of the input's norm; NormOut adds the residual, stores h * gain
    and accumulates sum(h**2): both against the reference, split K (the last slice finishes) or not, in fp32 and
    in bf16 (where outputs round to bf16, so equal sums may round a last bit apart)."""
    gen, seed = generator()
    m, n, k, group, config = CASES[case]
    tol = TOL if dtype == torch.float32 else 1e-2
    w = int_weight(n, k, 4, group, case == 1, gen).input_major()
    x = torch.randn(m, k, generator=gen).to(dtype)
    norm_in = NormIn(torch.rand(m + 1, generator=gen) * k, 1e-5)
    residual = torch.randn(m, n, generator=gen).to(dtype)
    gain = (torch.rand(n, generator=gen) + 0.5).to(dtype)
    start = torch.rand(m + 1, generator=gen)
    sums = [start.clone(), start.clone()]
    got = int_gemv_norm_triton(x, w, norm_in, NormOut(residual, gain, sums[0]), config)
    want = int_gemv_norm_ref(x, w, norm_in, NormOut(residual, gain, sums[1]))
    for a, b in zip((*got, sums[0]), (*want, sums[1])):
        assert rel_err(a, b) < tol, f"seed {seed}"
    out, normed = int_gemv_norm_triton(x, w, norm_in, None, config)
    assert normed is None and rel_err(out, int_gemv_norm_ref(x, w, norm_in)[0]) < tol, f"seed {seed}"


@pytest.mark.parametrize("case,bits,dtype", [(0, 4, torch.float32), (1, 2, torch.float32), (3, 4, torch.bfloat16)])
def test_gated_activation_in_the_epilogue(case, bits, dtype):
    """A [gate | up] weight gives silu(gate) * up: each tile takes half its columns from either half (a tile
    past the end of an odd half, split K or not), with and without the input norm's 1 / rms."""
    gen, seed = generator()
    m, n, k, group, config = CASES[case]
    half = n // 2 + 1  # odd halves for cases 0 and 3: the last tile is partly masked
    tol = 2 * TOL if dtype == torch.float32 else 1e-2  # a product of two sums: their errors add
    w = int_weight(2 * half, k, bits, group, case == 1, gen).input_major()
    x = torch.randn(m, k, generator=gen).to(dtype)
    for norm_in in (None, NormIn(torch.rand(m + 1, generator=gen) * k, 1e-5)):
        got, _ = int_gemv_norm_triton(x, w, norm_in, config=config, gated=True)
        want, _ = int_gemv_norm_ref(x, w, norm_in, gated=True)
        assert got.shape == (m, half) and rel_err(got, want) < tol, f"seed {seed}"
    assert not w.counters.any(), "the split-K counters must be left at zero for the next launch"
