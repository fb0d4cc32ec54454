"""FP8 and INT8 KV caches: the fused prologue quantizes on write and paged attention dequantizes on read,
under the interpreter against the references; the quantized cache stays close to a full-precision one."""

import pytest
import torch

pytest.importorskip("triton")

from slimserve.kernels.attention import paged_attention_triton  # noqa: E402
from slimserve.kernels.attention_ref import paged_attention_ref  # noqa: E402
from slimserve.kernels.rope_store import rope_and_store_triton  # noqa: E402
from slimserve.kernels.rope_store_ref import rope_and_store_ref  # noqa: E402
from tests.kernels.test_attention import make_batch, make_generator  # noqa: E402

KV_DTYPES = [torch.float8_e4m3fn, torch.int8]


@pytest.mark.parametrize("kv_dtype", KV_DTYPES)
def test_rope_store_quantizes_on_write(kv_dtype):
    gen, seed = make_generator()
    num_heads, num_kv_heads, head_dim, num_tokens, block_size, num_blocks = 4, 2, 64, 9, 4, 6
    qkv = torch.randn(num_tokens, (num_heads + 2 * num_kv_heads) * head_dim, generator=gen) * 3
    positions = torch.randint(0, 100, (num_tokens,), generator=gen)
    inv_freq = 1.0 / (10000 ** (torch.arange(0, head_dim, 2).float() / head_dim))
    freqs = torch.outer(torch.arange(100).float(), inv_freq)
    cos_sin = torch.cat((freqs.cos(), freqs.sin()), dim=-1)
    slots = torch.randperm(num_blocks * block_size, generator=gen)[:num_tokens].to(torch.int32)
    slots[2] = -1
    k_scale = torch.rand(num_kv_heads, generator=gen) * 0.05 + 0.02
    v_scale = torch.rand(num_kv_heads, generator=gen) * 0.05 + 0.02
    results = []
    for fn in (rope_and_store_triton, rope_and_store_ref):
        k_cache = torch.full((num_blocks, block_size, num_kv_heads, head_dim), 3, dtype=kv_dtype)
        v_cache = torch.full_like(k_cache, 3)
        q = fn(qkv, positions, cos_sin, k_cache, v_cache, slots, num_heads, num_kv_heads, k_scale=k_scale,
               v_scale=v_scale)  # fmt: skip
        results.append((q, k_cache.float(), v_cache.float()))
    (q, k, v), (rq, rk, rv) = results
    torch.testing.assert_close(q, rq, atol=1e-5, rtol=1e-5, msg=lambda m: f"seed {seed}: {m}")
    # Values on a rounding boundary may land on either neighbour after fp32 rotations in another order.
    for got, want in ((k, rk), (v, rv)):
        differ = got != want
        assert differ.float().mean() < 0.01, f"seed {seed}"
        assert ((got - want).abs()[differ] <= want.abs()[differ] / 8 + 1).all(), f"seed {seed}"


@pytest.mark.parametrize("kv_dtype", KV_DTYPES)
@pytest.mark.parametrize("mode", ["prefill", "decode"])
def test_attention_reads_quantized_cache(kv_dtype, mode):
    gen, seed = make_generator()
    cases = [(7, 30), (1, 0), (16, 16)] if mode == "prefill" else [(1, 40), (1, 0), (1, 9)]
    batch = make_batch(cases, 4, 2, 64, 16, torch.float32, gen)
    full_k, full_v = batch["k_cache"], batch["v_cache"]
    qmax = 448.0 if kv_dtype == torch.float8_e4m3fn else 127.0
    k_scale = full_k.abs().amax(dim=(0, 1, 3)) / qmax
    v_scale = full_v.abs().amax(dim=(0, 1, 3)) / qmax
    for name, scale in (("k_cache", k_scale), ("v_cache", v_scale)):
        scaled = batch[name] / scale[:, None]
        batch[name] = (scaled.round() if kv_dtype == torch.int8 else scaled).to(kv_dtype)
    max_q = max(q for q, _ in cases)
    kw = dict(k_scale=k_scale, v_scale=v_scale)
    out = paged_attention_triton(
        **batch, max_seqlen_q=max_q, block_m=16, block_n=16, num_splits=2 if max_q == 1 else None, **kw
    )
    ref = paged_attention_ref(**batch, **kw)
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=2e-5, msg=lambda m: f"seed {seed}: {m}")
    exact = paged_attention_ref(**{**batch, "k_cache": full_k, "v_cache": full_v})
    assert ((ref - exact).norm() / exact.norm()).item() < 0.05, f"seed {seed}"
