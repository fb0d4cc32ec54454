"""Triton rotary embedding, under the interpreter, against the plain-torch reference."""

import random

import pytest
import torch

pytest.importorskip("triton")

from slimserve.kernels.rotary import apply_rotary_triton  # noqa: E402
from slimserve.kernels.rotary_ref import apply_rotary_ref  # noqa: E402

TOLERANCES = {
    torch.float32: dict(atol=1e-5, rtol=1e-5),
    torch.float16: dict(atol=2e-3, rtol=2e-3),
    # Triton's CPU interpreter truncates fp32 -> bf16 where a GPU rounds to nearest: allow two bf16 ulps.
    torch.bfloat16: dict(atol=2e-2, rtol=1.6e-2),
}


def cos_sin_cache(max_pos: int, head_dim: int) -> torch.Tensor:
    inv_freq = 1.0 / (10000 ** (torch.arange(0, head_dim, 2).float() / head_dim))
    freqs = torch.outer(torch.arange(max_pos).float(), inv_freq)
    return torch.cat((freqs.cos(), freqs.sin()), dim=-1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("num_heads, num_kv_heads, head_dim", [(4, 2, 64), (3, 1, 96), (2, 2, 128)])
def test_rotary_matches_reference(dtype: torch.dtype, num_heads: int, num_kv_heads: int, head_dim: int) -> None:
    seed = random.randrange(2**31)
    gen = torch.Generator().manual_seed(seed)
    num_tokens = 11
    # q and k as strided views of one fused projection output, as the attention layer produces them.
    qkv = torch.randn(num_tokens, num_heads + 2 * num_kv_heads, head_dim, generator=gen).to(dtype)
    q, k = qkv[:, :num_heads], qkv[:, num_heads : num_heads + num_kv_heads]
    q_before, k_before = q.clone(), k.clone()
    positions = torch.randint(0, 300, (num_tokens,), generator=gen)
    cache = cos_sin_cache(300, head_dim)
    q_out, k_out = apply_rotary_triton(q, k, positions, cache)
    q_ref, k_ref = apply_rotary_ref(q, k, positions, cache)
    msg = lambda m: f"seed {seed}: {m}"
    torch.testing.assert_close(q_out, q_ref, **TOLERANCES[dtype], msg=msg)
    torch.testing.assert_close(k_out, k_ref, **TOLERANCES[dtype], msg=msg)
    # Out of place: the inputs are untouched.
    assert torch.equal(q, q_before) and torch.equal(k, k_before)
