"""Triton paged attention and KV-cache writes, under the interpreter, against the plain-torch references."""

import os
import random
import subprocess
import sys

import pytest
import torch

pytest.importorskip("triton")

from slimserve.kernels.attention import paged_attention_triton  # noqa: E402
from slimserve.kernels.attention_ref import paged_attention_ref  # noqa: E402

TOLERANCES = {
    torch.float32: dict(atol=2e-5, rtol=2e-5),
    torch.float16: dict(atol=4e-3, rtol=4e-3),
    torch.bfloat16: dict(atol=3e-2, rtol=2e-2),
}


def make_generator() -> tuple[torch.Generator, int]:
    """Fresh inputs on every run; the seed goes into failure messages to replay a case."""
    seed = random.randrange(2**31)
    return torch.Generator().manual_seed(seed), seed


def make_batch(
    cases: list[tuple[int, int]],
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    block_size: int,
    dtype: torch.dtype,
    gen: torch.Generator,
) -> dict:
    """(q_len, seq_len) per sequence -> packed queries and a randomly paged, randomly filled KV cache."""
    q_lens = [q for q, _ in cases]
    seq_lens = [s for _, s in cases]
    blocks = [-(-s // block_size) for s in seq_lens]
    num_blocks = sum(blocks) + 2  # a few blocks nobody owns
    max_blocks = max(blocks) + 1  # the table is wider than any sequence needs
    order = torch.randperm(num_blocks, generator=gen).int()
    # Entries past a sequence's blocks point outside the cache: reading one would be a bug.
    tables = torch.full((len(cases), max_blocks), 10 * num_blocks, dtype=torch.int32)
    used = 0
    for i, n in enumerate(blocks):
        tables[i, :n] = order[used : used + n]
        used += n
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    cu = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=torch.int32)
    return dict(
        q=torch.randn(sum(q_lens), num_heads, head_dim, generator=gen).to(dtype),
        k_cache=torch.randn(shape, generator=gen).to(dtype),
        v_cache=torch.randn(shape, generator=gen).to(dtype),
        cu_seqlens_q=cu,
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32),
        block_tables=tables,
        scale=head_dim**-0.5,
    )


def check(batch: dict, seed: int, **overrides) -> None:
    max_seqlen_q = int((batch["cu_seqlens_q"][1:] - batch["cu_seqlens_q"][:-1]).max())
    out = paged_attention_triton(**batch, max_seqlen_q=max_seqlen_q, **overrides)
    ref = paged_attention_ref(**batch)
    torch.testing.assert_close(out, ref, **TOLERANCES[batch["q"].dtype], msg=lambda m: f"seed {seed}: {m}")


# Pure prefill (odd length), prefill after a cached prefix, decode rows inside a prefill batch, a prompt of
# exactly one tile, and a padding sequence.
PREFILL_MIX = [(19, 19), (20, 50), (5, 37), (1, 23), (16, 16), (2, 0)]


@pytest.mark.parametrize(
    "num_heads, num_kv_heads, block_size",
    [(4, 4, 16), (6, 2, 32), (4, 1, 16)],
    ids=["mha-bs16", "gqa3-bs32", "mqa-bs16"],
)
def test_prefill_matches_reference(num_heads: int, num_kv_heads: int, block_size: int) -> None:
    gen, seed = make_generator()
    batch = make_batch(PREFILL_MIX, num_heads, num_kv_heads, 64, block_size, torch.float32, gen)
    check(batch, seed, block_m=16, block_n=16)


@pytest.mark.parametrize("head_dim", [128, 96])
def test_prefill_head_dims(head_dim: int) -> None:
    gen, seed = make_generator()
    batch = make_batch([(9, 20), (17, 17)], 2, 1, head_dim, 16, torch.float32, gen)
    check(batch, seed, block_m=16, block_n=32)


def test_prefill_tile_spans_blocks_and_default_tiles() -> None:
    # The default tiles (64 x 64) are larger than the second prompt and than a cache block.
    gen, seed = make_generator()
    check(make_batch([(40, 70), (3, 3)], 2, 1, 64, 16, torch.float32, gen), seed)


# Decode: short and long contexts, a context that ends exactly on a block, a padding sequence and a
# sequence with no new token.
DECODE_MIX = [(1, 1), (1, 70), (1, 32), (1, 0), (0, 5), (1, 45)]


@pytest.mark.parametrize("num_splits", [1, 3, None])
@pytest.mark.parametrize(
    "num_heads, num_kv_heads, block_size",
    [(4, 4, 16), (8, 2, 32), (3, 1, 16)],
    ids=["mha-bs16", "gqa4-bs32", "mqa3-bs16"],
)
def test_decode_matches_reference(num_heads: int, num_kv_heads: int, block_size: int, num_splits: int | None) -> None:
    gen, seed = make_generator()
    batch = make_batch(DECODE_MIX, num_heads, num_kv_heads, 64, block_size, torch.float32, gen)
    check(batch, seed, block_n=16, num_splits=num_splits)


@pytest.mark.parametrize("head_dim", [128, 96])
def test_decode_head_dims(head_dim: int) -> None:
    gen, seed = make_generator()
    batch = make_batch([(1, 33), (1, 7)], 4, 2, head_dim, 16, torch.float32, gen)
    check(batch, seed, block_n=16, num_splits=2)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision(dtype: torch.dtype) -> None:
    gen, seed = make_generator()
    check(make_batch([(11, 30), (1, 0), (1, 20)], 4, 2, 64, 16, dtype, gen), seed, block_m=16, block_n=16)
    check(make_batch([(1, 50), (1, 0), (1, 9)], 4, 2, 64, 16, dtype, gen), seed, block_n=16, num_splits=2)


def test_modules_import_without_triton() -> None:
    # CPU-only installs may lack triton: the modules still import and fall back to the references.
    code = (
        "import sys; sys.modules['triton'] = None\n"
        "import torch\n"
        "from slimserve.kernels import activation, attention, norm, rope_store\n"
        "assert not attention.HAS_TRITON\n"
        "x = torch.randn(2, 8)\n"
        "torch.testing.assert_close(activation.silu_and_mul(x), activation.silu_and_mul_ref(x))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    subprocess.run([sys.executable, "-c", code], check=True, env=env)
