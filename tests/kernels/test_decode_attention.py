"""Decode launches of the Triton paged attention (key tiles, warps, fp16 dot products over an FP8 or INT8 cache,
many splits), under the interpreter against the plain-torch reference."""

import pytest
import torch

pytest.importorskip("triton")

from slimserve.kernels import attention  # noqa: E402
from slimserve.kernels.attention import DecodeConfig, paged_attention_triton  # noqa: E402
from slimserve.kernels.attention_ref import paged_attention_ref  # noqa: E402
from tests.kernels.test_attention import TOLERANCES, make_batch, make_generator  # noqa: E402

# Odd lengths, a context ending on a tile, a padding sequence and a sequence without a new token.
DECODE_MIX = [(1, 1), (1, 77), (1, 33), (1, 0), (0, 5), (1, 130)]
GROUPS = [(2, 2), (8, 2), (8, 1)]  # query heads per KV head: 1, 4, 8
CONFIGS = {
    "tile-32": DecodeConfig(block_n=32, num_warps=8, num_stages=2),
    "f16-dot": DecodeConfig(block_n=16, f16_dot=True),
    "f16-dot-32": DecodeConfig(block_n=32, num_stages=2, f16_dot=True),
}


def quantize_cache(batch: dict, gen: torch.Generator, dtype: torch.dtype = torch.float8_e4m3fn) -> dict:
    """FP8 or INT8 cache of random per-KV-head scales, queries in bf16 (as the engine runs them)."""
    num_kv_heads = batch["k_cache"].shape[2]
    scales = {}
    for name in ("k", "v"):
        scales[f"{name}_scale"] = torch.rand(num_kv_heads, generator=gen) * 0.05 + 0.01
        values = batch[f"{name}_cache"] * 20
        batch[f"{name}_cache"] = (values.round().clamp(-128, 127) if dtype == torch.int8 else values).to(dtype)
    batch["q"] = batch["q"].bfloat16()
    return scales


@pytest.mark.parametrize("config", sorted(CONFIGS))
@pytest.mark.parametrize("num_heads, num_kv_heads", GROUPS, ids=["group1", "group4", "group8"])
def test_decode_configs_float_cache(config: str, num_heads: int, num_kv_heads: int) -> None:
    # f16_dot only applies to a quantized cache: the fp32 cache runs its usual dot products.
    gen, seed = make_generator()
    batch = make_batch(DECODE_MIX, num_heads, num_kv_heads, 64, 16, torch.float32, gen)
    for num_splits in (1, 3):
        out = paged_attention_triton(**batch, max_seqlen_q=1, num_splits=num_splits, decode_config=CONFIGS[config])
        ref = paged_attention_ref(**batch)
        torch.testing.assert_close(out, ref, **TOLERANCES[torch.float32], msg=lambda m: f"seed {seed}: {m}")


@pytest.mark.parametrize("config", ["plain", *sorted(CONFIGS)])
@pytest.mark.parametrize("num_heads, num_kv_heads", GROUPS, ids=["group1", "group4", "group8"])
def test_decode_configs_fp8_cache(config: str, num_heads: int, num_kv_heads: int) -> None:
    gen, seed = make_generator()
    batch = make_batch(DECODE_MIX, num_heads, num_kv_heads, 64, 16, torch.float32, gen)
    scales = quantize_cache(batch, gen)
    cfg = CONFIGS.get(config, DecodeConfig(block_n=16))
    out = paged_attention_triton(**batch, max_seqlen_q=1, num_splits=2, decode_config=cfg, **scales)
    ref = paged_attention_ref(**batch, **scales)
    torch.testing.assert_close(out, ref, **TOLERANCES[torch.bfloat16], msg=lambda m: f"seed {seed}: {m}")


@pytest.mark.parametrize("kv_dtype", [torch.bfloat16, torch.float8_e4m3fn, torch.int8], ids=["bf16", "fp8", "int8"])
def test_decode_table_launch(kv_dtype: torch.dtype) -> None:
    # The launch the engine gets from DECODE_CONFIGS for its cache dtype (tiles of 128 keys, whole waves of
    # splits; fp16 dot products over a one-byte cache), over the decode mix.
    gen, seed = make_generator()
    batch = make_batch(DECODE_MIX, 8, 2, 64, 16, torch.float32, gen)
    if kv_dtype == torch.bfloat16:
        scales = {}
        batch.update({name: batch[name].bfloat16() for name in ("q", "k_cache", "v_cache")})
    else:
        scales = quantize_cache(batch, gen, kv_dtype)
    out = paged_attention_triton(**batch, max_seqlen_q=1, **scales)
    ref = paged_attention_ref(**batch, **scales)
    torch.testing.assert_close(out, ref, **TOLERANCES[torch.bfloat16], msg=lambda m: f"seed {seed}: {m}")


@pytest.mark.parametrize("magnitude", [3e4, 1e-5])
def test_f16_dot_scales_queries_outside_fp16_range(magnitude: float) -> None:
    # Queries past fp16's largest value (and far below its normal range) still give the reference's answer:
    # each row is brought into range by a power of two that the scores undo.
    gen, seed = make_generator()
    batch = make_batch([(1, 40), (1, 9)], 4, 2, 64, 16, torch.float32, gen)
    scales = quantize_cache(batch, gen)
    batch["q"] = (batch["q"].float() * magnitude).bfloat16()
    batch["scale"] = 1.0 / magnitude
    out = paged_attention_triton(**batch, max_seqlen_q=1, num_splits=2, decode_config=CONFIGS["f16-dot"], **scales)
    ref = paged_attention_ref(**batch, **scales)
    assert out.isfinite().all(), f"seed {seed}"
    torch.testing.assert_close(out, ref, **TOLERANCES[torch.bfloat16], msg=lambda m: f"seed {seed}: {m}")


def test_many_splits_merge_in_chunks() -> None:
    # 40 splits of 16 keys: the merge reads the partial results in several chunks, most splits of the short
    # sequences are empty.
    gen, seed = make_generator()
    batch = make_batch([(1, 600), (1, 17), (1, 0)], 4, 2, 64, 16, torch.float32, gen)
    out = paged_attention_triton(**batch, max_seqlen_q=1, block_n=16, num_splits=40)
    ref = paged_attention_ref(**batch)
    torch.testing.assert_close(out, ref, **TOLERANCES[torch.float32], msg=lambda m: f"seed {seed}: {m}")


def test_split_count(monkeypatch: pytest.MonkeyPatch) -> None:
    # 132 SMs, 8 KV heads: batch 1 fills two programs per SM exactly; at batch 8 the count rounds up (an extra,
    # partly filled wave) or, with whole_waves, down; short block tables cap the splits at 256 keys each.
    monkeypatch.setattr(attention, "_sm_count", lambda device: 132)
    cpu = torch.device("cpu")
    up, down = DecodeConfig(programs_per_sm=2), DecodeConfig(programs_per_sm=2, whole_waves=True)
    assert attention._decode_splits(1, 8, 32768, cpu, up) == attention._decode_splits(1, 8, 32768, cpu, down) == 33
    assert attention._decode_splits(8, 8, 32768, cpu, up) == 5
    assert attention._decode_splits(8, 8, 32768, cpu, down) == 4
    assert attention._decode_splits(64, 8, 32768, cpu, down) == 1
    assert attention._decode_splits(1, 8, 1000, cpu, up) == 4
