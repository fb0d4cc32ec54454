"""Triton RMSNorm, under the interpreter, against the plain-torch reference."""

import random

import pytest
import torch

pytest.importorskip("triton")

from slimserve.kernels.norm import rms_norm_triton  # noqa: E402
from slimserve.kernels.norm_ref import rms_norm_ref  # noqa: E402

TOLERANCES = {
    torch.float32: dict(atol=1e-5, rtol=1e-5),
    torch.float16: dict(atol=2e-3, rtol=2e-3),
    # Triton's CPU interpreter truncates fp32 -> bf16 where a GPU rounds to nearest: allow two bf16 ulps.
    torch.bfloat16: dict(atol=2e-2, rtol=1.6e-2),
}


def make_generator() -> tuple[torch.Generator, int]:
    seed = random.randrange(2**31)
    return torch.Generator().manual_seed(seed), seed


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("with_residual", [False, True])
def test_rms_norm_matches_reference(dtype: torch.dtype, with_residual: bool) -> None:
    gen, seed = make_generator()
    hidden = 200  # not a power of two: the row is masked
    x = (3 * torch.randn(2, 7, hidden, generator=gen)).to(dtype)
    weight = (1 + 0.1 * torch.randn(hidden, generator=gen)).to(dtype)
    residual = torch.randn(2, 7, hidden, generator=gen).to(dtype) if with_residual else None
    out = rms_norm_triton(x, weight, 1e-6, residual)
    ref = rms_norm_ref(x, weight, 1e-6, residual)
    msg = lambda m: f"seed {seed}: {m}"
    if with_residual:
        torch.testing.assert_close(out[0], ref[0], **TOLERANCES[dtype], msg=msg)
        # The new residual is a plain sum rounded once: exact, up to the interpreter's bf16 truncation.
        exact = dict(atol=0, rtol=2**-7 if dtype == torch.bfloat16 else 0)
        torch.testing.assert_close(out[1], ref[1], **exact, msg=msg)
    else:
        torch.testing.assert_close(out, ref, **TOLERANCES[dtype], msg=msg)


def test_rms_norm_mixed_weight_dtype_and_strided_input() -> None:
    # An fp32 weight with bf16 activations promotes the output to fp32, as in the reference.
    gen, seed = make_generator()
    x = torch.randn(5, 2 * 64, generator=gen).to(torch.bfloat16)[:, :64]
    weight = torch.randn(64, generator=gen)
    out = rms_norm_triton(x, weight, 1e-5)
    assert out.dtype == torch.float32
    ref = rms_norm_ref(x, weight, 1e-5)
    torch.testing.assert_close(out, ref, **TOLERANCES[torch.bfloat16], msg=lambda m: f"seed {seed}: {m}")
