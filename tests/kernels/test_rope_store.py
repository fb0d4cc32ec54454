"""The fused attention prologue (q/k norm, rotary, KV-cache write) under the interpreter vs its reference."""

import random

import pytest
import torch

pytest.importorskip("triton")

from slimserve.kernels.rope_store import rope_and_store_triton  # noqa: E402
from slimserve.kernels.rope_store_ref import rope_and_store_ref  # noqa: E402

TOLERANCES = {
    torch.float32: dict(atol=1e-5, rtol=1e-5),
    # Triton's CPU interpreter truncates fp32 -> bf16 where a GPU rounds to nearest: allow two bf16 ulps.
    torch.bfloat16: dict(atol=3e-2, rtol=1.6e-2),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("qk_norm", [False, True])
@pytest.mark.parametrize("num_heads, num_kv_heads, head_dim", [(4, 2, 64), (3, 1, 96), (2, 2, 128)])
def test_matches_reference(dtype, qk_norm, num_heads, num_kv_heads, head_dim):
    seed = random.randrange(2**31)
    gen = torch.Generator().manual_seed(seed)
    num_tokens, block_size, num_blocks = 9, 4, 6
    qkv = torch.randn(num_tokens, (num_heads + 2 * num_kv_heads) * head_dim, generator=gen).to(dtype)
    positions = torch.randint(0, 200, (num_tokens,), generator=gen)
    inv_freq = 1.0 / (10000 ** (torch.arange(0, head_dim, 2).float() / head_dim))
    freqs = torch.outer(torch.arange(200).float(), inv_freq)
    cos_sin = torch.cat((freqs.cos(), freqs.sin()), dim=-1)
    slots = torch.randperm(num_blocks * block_size, generator=gen)[:num_tokens].to(torch.int32)
    slots[3] = -1  # a padding token: nothing may be written for it
    weights = [torch.rand(head_dim, generator=gen).to(dtype) + 0.5 for _ in range(2)] if qk_norm else [None, None]
    caches = []
    for fn in (rope_and_store_triton, rope_and_store_ref):
        k_cache = torch.full((num_blocks, block_size, num_kv_heads, head_dim), 7.0, dtype=dtype)
        v_cache = torch.full_like(k_cache, 7.0)
        q = fn(qkv, positions, cos_sin, k_cache, v_cache, slots, num_heads, num_kv_heads, *weights, 1e-6)
        caches.append((q, k_cache, v_cache))
    for got, want in zip(caches[0], caches[1]):
        torch.testing.assert_close(got, want, **TOLERANCES[dtype], msg=lambda m: f"seed {seed}: {m}")
    untouched = torch.ones(num_blocks * block_size, dtype=torch.bool)
    untouched[slots[slots >= 0].long()] = False
    assert (caches[0][1].view(-1, num_kv_heads, head_dim)[untouched] == 7.0).all()
