"""Triton gated SiLU, under the interpreter, against the plain-torch reference."""

import random

import pytest
import torch

pytest.importorskip("triton")

from slimserve.kernels.activation import silu_and_mul_triton  # noqa: E402
from slimserve.kernels.activation_ref import silu_and_mul_ref  # noqa: E402

TOLERANCES = {
    torch.float32: dict(atol=1e-6, rtol=1e-5),
    torch.float16: dict(atol=1e-3, rtol=1e-3),
    # Triton's CPU interpreter truncates fp32 -> bf16 where a GPU rounds to nearest: allow two bf16 ulps.
    torch.bfloat16: dict(atol=1e-2, rtol=1.6e-2),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(3, 2 * 77), (2, 5, 2 * 1500)], ids=["odd-width", "3d-two-column-blocks"])
def test_silu_and_mul_matches_reference(dtype: torch.dtype, shape: tuple[int, ...]) -> None:
    seed = random.randrange(2**31)
    x = (4 * torch.randn(shape, generator=torch.Generator().manual_seed(seed))).to(dtype)
    out = silu_and_mul_triton(x)
    torch.testing.assert_close(out, silu_and_mul_ref(x), **TOLERANCES[dtype], msg=lambda m: f"seed {seed}: {m}")
