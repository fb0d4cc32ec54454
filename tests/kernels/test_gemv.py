"""The decode GEMVs (with a fused prologue or without), under the interpreter, against the plain-torch
references."""

import random

import pytest
import torch

pytest.importorskip("triton")

from slimserve.kernels.gemv import gemv_triton, norm_gemv_triton, silu_mul_gemv_triton  # noqa: E402
from slimserve.kernels.gemv_ref import gemv_ref, norm_gemv_ref, silu_mul_gemv_ref  # noqa: E402

# bf16: the interpreter truncates fp32 -> bf16 where the reference rounds, and sums in another order.
TOLERANCES = {torch.float32: dict(atol=1e-4, rtol=1e-4), torch.bfloat16: dict(atol=6e-2, rtol=4e-2)}
# (BLOCK_N, BLOCK_K[, STAGES]): rows and columns masked at the edges, one K block or several; the K loop one tile
# ahead in registers, or pipelined through shared memory (STAGES > 1).
BLOCKS = [(4, 64), (8, 32), (1, 128), (16, 16), (4, 32, 3), (8, 64, 2)]


def make_generator() -> tuple[torch.Generator, int]:
    seed = random.randrange(2**31)
    return torch.Generator().manual_seed(seed), seed


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_residual", [False, True])
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("block", BLOCKS)
def test_norm_gemv_matches_reference(
    dtype: torch.dtype, with_residual: bool, with_bias: bool, block: tuple[int, ...]
) -> None:
    gen, seed = make_generator()
    rows, k, n = 2, 200, 37  # odd sizes: both the weight rows and the reduction are masked
    x = (2 * torch.randn(rows, k, generator=gen)).to(dtype)
    residual = torch.randn(rows, k, generator=gen).to(dtype) if with_residual else None
    norm_weight = (1 + 0.1 * torch.randn(k, generator=gen)).to(dtype)
    weight = (torch.randn(n, k, generator=gen) / k**0.5).to(dtype)
    bias = torch.randn(n, generator=gen).to(dtype) if with_bias else None
    out, new_residual = norm_gemv_triton(x, weight, bias, norm_weight, 1e-6, residual, block=block)
    ref, ref_residual = norm_gemv_ref(x, weight, bias, norm_weight, 1e-6, residual)
    msg = lambda m: f"seed {seed}: {m}"
    torch.testing.assert_close(out, ref, **TOLERANCES[dtype], msg=msg)
    # The new residual is one rounded sum: exact, up to the interpreter's bf16 truncation.
    exact = dict(atol=0, rtol=2**-7 if dtype == torch.bfloat16 else 0)
    torch.testing.assert_close(new_residual, ref_residual, **exact, msg=msg)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("block", BLOCKS)
def test_silu_mul_gemv_matches_reference(dtype: torch.dtype, block: tuple[int, ...]) -> None:
    gen, seed = make_generator()
    inter, n = 150, 45
    x = (2 * torch.randn(3, 2 * inter, generator=gen)).to(dtype)
    weight = (torch.randn(n, inter, generator=gen) / inter**0.5).to(dtype)
    bias = torch.randn(n, generator=gen).to(dtype)
    out = silu_mul_gemv_triton(x, weight, bias, block=block)
    torch.testing.assert_close(out, silu_mul_gemv_ref(x, weight, bias), **TOLERANCES[dtype], msg=lambda m: f"{seed}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("block", BLOCKS)
def test_plain_gemv_matches_reference(dtype: torch.dtype, with_bias: bool, block: tuple[int, ...]) -> None:
    gen, seed = make_generator()
    k, n = 130, 29
    x = torch.randn(2, k, generator=gen).to(dtype)
    weight = (torch.randn(n, k, generator=gen) / k**0.5).to(dtype)
    bias = torch.randn(n, generator=gen).to(dtype) if with_bias else None
    out = gemv_triton(x, weight, bias, block=block)
    torch.testing.assert_close(out, gemv_ref(x, weight, bias), **TOLERANCES[dtype], msg=lambda m: f"{seed}")


def test_tuned_launch_runs_under_the_interpreter() -> None:
    # Without an explicit block the autotuned kernel runs (one configuration under the interpreter).
    gen, _ = make_generator()
    x, res = torch.randn(1, 64, generator=gen), torch.randn(1, 64, generator=gen)
    weight, norm_weight = torch.randn(24, 64, generator=gen), torch.ones(64)
    out, new_residual = norm_gemv_triton(x, weight, None, norm_weight, 1e-5, res)
    ref, ref_residual = norm_gemv_ref(x, weight, None, norm_weight, 1e-5, res)
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(new_residual, ref_residual)
