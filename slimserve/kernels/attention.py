"""Paged attention in Triton, beside the plain-torch reference in attention_ref.py.

Two attention paths share one inner loop (online softmax in fp32, K/V gathered token by token through the
block table, so a key tile may span several cache blocks):
- prefill: one program per (tile of BLOCK_M queries, sequence, query head); handles chunked prefill over a
  cached prefix and mixed batches, with the causal mask applied only on the diagonal tiles;
- decode (every sequence has at most one new token): one program per (sequence, kv head, split). The query
  heads of a GQA group share the program, packed into the M dimension of the dot, so each K/V tile is read
  once per kv head. Long contexts are split over several programs (flash-decoding) and merged by a small
  reduce kernel; the number of splits depends only on host-known shapes, so CUDA-graph replays stay valid.
"""

import functools
from dataclasses import dataclass, replace

import torch

from slimserve.kernels.attention_ref import paged_attention_ref
from slimserve.kernels.common import pdl_options
from slimserve.kernels.dispatch import HAS_TRITON, INTERPRETED, use_triton

if HAS_TRITON:
    import triton
    import triton.language as tl

    from slimserve.kernels.common import dot as _dot
    from slimserve.kernels.common import wait_for_previous

    @triton.jit
    def _attend(
        acc,
        l_i,
        m_i,
        q,
        q_pos,
        k_cache_ptr,
        v_cache_ptr,
        table_ptr,
        kv_head_off,
        stride_cb,
        stride_cs,
        lo,
        hi,
        seq_len,
        qk_scale,
        MASKED: tl.constexpr,
        CAUSAL: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_SIZE: tl.constexpr,
        HEAD_DIM: tl.constexpr,
        BLOCK_D: tl.constexpr,
        UPCAST: tl.constexpr,
        KV_QUANT: tl.constexpr,
    ):
        """Online-softmax accumulation of keys lo..hi (multiples of BLOCK_N apart) into acc, l_i, m_i.

        Scores are in log2 units (qk_scale includes log2(e)). Unmasked calls must cover only keys that every
        query row may see and that exist, which lets the compiler drop all key masks there."""
        offs_d = tl.arange(0, BLOCK_D)
        d_mask = offs_d < HEAD_DIM
        for start in range(lo, hi, BLOCK_N):
            offs_n = start + tl.arange(0, BLOCK_N)
            if MASKED:
                n_mask = offs_n < seq_len
            else:
                n_mask = tl.full([BLOCK_N], 1, tl.int1)
            block = tl.load(table_ptr + offs_n // BLOCK_SIZE, mask=n_mask, other=0).to(tl.int64)
            kv_off = block * stride_cb + (offs_n % BLOCK_SIZE) * stride_cs + kv_head_off
            kv_mask = n_mask[:, None] & d_mask[None, :]
            k = tl.load(k_cache_ptr + kv_off[:, None] + offs_d[None, :], mask=kv_mask, other=0.0)
            if KV_QUANT:
                k = k.to(q.dtype)  # exact: FP8 and INT8 values are bf16/fp16 values; the scale is in qk_scale
            qk = _dot(q, tl.trans(k), UPCAST) * qk_scale
            if MASKED:
                visible = n_mask[None, :]
                if CAUSAL:
                    visible = visible & (offs_n[None, :] <= q_pos[:, None])
                qk = tl.where(visible, qk, float("-inf"))
            # Every row sees at least one key of its first tile, so m_new is finite from then on.
            m_new = tl.maximum(m_i, tl.max(qk, 1))
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(qk - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            v = tl.load(v_cache_ptr + kv_off[:, None] + offs_d[None, :], mask=kv_mask, other=0.0)
            if KV_QUANT:
                v = v.to(q.dtype)
            acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, UPCAST)
            m_i = m_new
        return acc, l_i, m_i

    @triton.jit
    def _prefill_kernel(
        q_ptr,
        k_cache_ptr,
        v_cache_ptr,
        out_ptr,
        cu_q_ptr,
        seq_lens_ptr,
        tables_ptr,
        k_scale_ptr,
        v_scale_ptr,
        qk_scale,
        stride_qt,
        stride_qh,
        stride_ot,
        stride_oh,
        stride_cb,
        stride_cs,
        stride_ch,
        stride_table,
        GROUP: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_SIZE: tl.constexpr,
        HEAD_DIM: tl.constexpr,
        BLOCK_D: tl.constexpr,
        UPCAST: tl.constexpr,
        KV_QUANT: tl.constexpr,
    ):
        tile = tl.program_id(0)
        seq = tl.program_id(1)
        head = tl.program_id(2)
        q_start = tl.load(cu_q_ptr + seq).to(tl.int32)
        q_len = tl.load(cu_q_ptr + seq + 1).to(tl.int32) - q_start
        seq_len = tl.load(seq_lens_ptr + seq).to(tl.int32)
        m0 = tile * BLOCK_M
        offs_m = m0 + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        rows = (q_start + offs_m).to(tl.int64)
        io_mask = (offs_m < q_len)[:, None] & (offs_d < HEAD_DIM)[None, :]
        q = tl.load(q_ptr + rows[:, None] * stride_qt + head * stride_qh + offs_d[None, :], mask=io_mask, other=0.0)
        # The queries are the last q_len tokens of the sequence: query i sits at position seq_len - q_len + i.
        first_pos = seq_len - q_len + m0
        q_pos = first_pos + tl.arange(0, BLOCK_M)
        # Keys past the tile's last query are never visible; tiles past this sequence's queries do nothing.
        hi = tl.where(m0 < q_len, tl.minimum(first_pos + BLOCK_M, seq_len), 0)
        # Keys up to the tile's first query are visible to all its rows: no mask needed there.
        full = tl.minimum(tl.maximum(first_pos + 1, 0) // BLOCK_N * BLOCK_N, tl.maximum(hi, 0))

        table_ptr = tables_ptr + seq.to(tl.int64) * stride_table
        kv_head_off = (head // GROUP) * stride_ch
        v_scale = 1.0
        if KV_QUANT:
            qk_scale = qk_scale * tl.load(k_scale_ptr + head // GROUP)
            v_scale = tl.load(v_scale_ptr + head // GROUP)
        acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        acc, l_i, m_i = _attend(acc, l_i, m_i, q, q_pos, k_cache_ptr, v_cache_ptr, table_ptr, kv_head_off,
                                stride_cb, stride_cs, 0, full, seq_len, qk_scale, False, True,
                                BLOCK_N, BLOCK_SIZE, HEAD_DIM, BLOCK_D, UPCAST, KV_QUANT)  # fmt: skip
        acc, l_i, m_i = _attend(acc, l_i, m_i, q, q_pos, k_cache_ptr, v_cache_ptr, table_ptr, kv_head_off,
                                stride_cb, stride_cs, full, hi, seq_len, qk_scale, True, True,
                                BLOCK_N, BLOCK_SIZE, HEAD_DIM, BLOCK_D, UPCAST, KV_QUANT)  # fmt: skip
        # Padding sequences (seq_len 0) saw no key: l = 0, acc = 0, and they write zeros.
        out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None] * v_scale
        dst = out_ptr + rows[:, None] * stride_ot + head * stride_oh + offs_d[None, :]
        tl.store(dst, out.to(out_ptr.dtype.element_ty), mask=io_mask)

    @triton.jit
    def _decode_kernel(
        q_ptr,
        k_cache_ptr,
        v_cache_ptr,
        out_ptr,
        part_o_ptr,
        part_lse_ptr,
        cu_q_ptr,
        seq_lens_ptr,
        tables_ptr,
        k_scale_ptr,
        v_scale_ptr,
        qk_scale,
        stride_qt,
        stride_qh,
        stride_ot,
        stride_oh,
        stride_cb,
        stride_cs,
        stride_ch,
        stride_table,
        num_heads,
        GROUP: tl.constexpr,
        BLOCK_G: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_SIZE: tl.constexpr,
        HEAD_DIM: tl.constexpr,
        BLOCK_D: tl.constexpr,
        SPLIT: tl.constexpr,
        UPCAST: tl.constexpr,
        KV_QUANT: tl.constexpr,
        F16_DOT: tl.constexpr,
        USE_PDL: tl.constexpr,
    ):
        seq = tl.program_id(0)
        kv_head = tl.program_id(1)
        split = tl.program_id(2)
        num_splits = tl.num_programs(2)
        # The step's inputs (not the previous kernel's output) load before the wait; q and the cache after it.
        q_row = tl.load(cu_q_ptr + seq).to(tl.int64)
        has_query = tl.load(cu_q_ptr + seq + 1).to(tl.int64) > q_row
        seq_len = tl.where(has_query, tl.load(seq_lens_ptr + seq).to(tl.int32), 0)
        wait_for_previous(USE_PDL)
        offs_g = tl.arange(0, BLOCK_G)
        offs_d = tl.arange(0, BLOCK_D)
        heads = kv_head * GROUP + offs_g
        # A sequence without a new token owns no output row (its q_row is the next sequence's).
        io_mask = (offs_g < tl.where(has_query, GROUP, 0))[:, None] & (offs_d < HEAD_DIM)[None, :]
        q = tl.load(q_ptr + q_row * stride_qt + heads[:, None] * stride_qh + offs_d[None, :], mask=io_mask, other=0.0)

        # This split's keys: an equal share of the sequence's key tiles.
        split_len = tl.cdiv(tl.cdiv(seq_len, BLOCK_N), num_splits) * BLOCK_N
        lo = split * split_len
        hi = tl.maximum(tl.minimum(lo + split_len, seq_len), lo)
        full = tl.maximum(hi // BLOCK_N * BLOCK_N, lo)

        table_ptr = tables_ptr + seq.to(tl.int64) * stride_table
        kv_head_off = kv_head * stride_ch
        v_scale = 1.0
        if KV_QUANT:
            qk_scale = qk_scale * tl.load(k_scale_ptr + kv_head)
            v_scale = tl.load(v_scale_ptr + kv_head)
        if F16_DOT:
            # FP8 and INT8 values are exact in fp16, whose conversion from them is one instruction per pair
            # (bf16 takes several). Each bf16 query row is scaled by a power of two that puts its largest
            # entry in [2^14, 2^15): exact, fp16 holds 3 more mantissa bits, and the factor goes into the
            # row's score scale. Probabilities become fp16 for the PV product, as in fp16 models.
            q = q.to(tl.float32)
            exponent = (tl.max(tl.abs(q), 1).to(tl.int32, bitcast=True) >> 23) & 0xFF
            shift = tl.minimum(tl.maximum(141 - exponent, -126), 126)  # 14 - (exponent - 127)
            row_scale = ((shift + 127) << 23).to(tl.float32, bitcast=True)
            q = (q * row_scale[:, None]).to(tl.float16)
            qk_scale = (qk_scale / row_scale)[:, None]
        acc = tl.zeros([BLOCK_G, BLOCK_D], dtype=tl.float32)
        l_i = tl.zeros([BLOCK_G], dtype=tl.float32)
        m_i = tl.full([BLOCK_G], float("-inf"), dtype=tl.float32)
        acc, l_i, m_i = _attend(acc, l_i, m_i, q, offs_g, k_cache_ptr, v_cache_ptr, table_ptr, kv_head_off,
                                stride_cb, stride_cs, lo, full, seq_len, qk_scale, False, False,
                                BLOCK_N, BLOCK_SIZE, HEAD_DIM, BLOCK_D, UPCAST, KV_QUANT)  # fmt: skip
        acc, l_i, m_i = _attend(acc, l_i, m_i, q, offs_g, k_cache_ptr, v_cache_ptr, table_ptr, kv_head_off,
                                stride_cb, stride_cs, full, hi, seq_len, qk_scale, True, False,
                                BLOCK_N, BLOCK_SIZE, HEAD_DIM, BLOCK_D, UPCAST, KV_QUANT)  # fmt: skip
        l_safe = tl.where(l_i == 0.0, 1.0, l_i)
        out = acc / l_safe[:, None] * v_scale
        if not SPLIT:
            dst = out_ptr + q_row * stride_ot + heads[:, None] * stride_oh + offs_d[None, :]
            tl.store(dst, out.to(out_ptr.dtype.element_ty), mask=io_mask)
        else:
            # Partial results [seq, head, split, :] and their log2-sum-exp, merged by _reduce_splits_kernel.
            part = (seq * num_heads + heads).to(tl.int64) * num_splits + split
            tl.store(part_o_ptr + part[:, None] * HEAD_DIM + offs_d[None, :], out, mask=io_mask)
            tl.store(part_lse_ptr + part, m_i + tl.log2(l_safe), mask=offs_g < tl.where(has_query, GROUP, 0))

    @triton.jit
    def _reduce_splits_kernel(
        part_o_ptr,
        part_lse_ptr,
        out_ptr,
        cu_q_ptr,
        stride_ot,
        stride_oh,
        num_splits,
        BLOCK_S: tl.constexpr,
        CHUNK_S: tl.constexpr,
        HEAD_DIM: tl.constexpr,
        BLOCK_D: tl.constexpr,
        USE_PDL: tl.constexpr,
    ):
        seq = tl.program_id(0)
        head = tl.program_id(1)
        q_row = tl.load(cu_q_ptr + seq).to(tl.int64)
        has_query = tl.load(cu_q_ptr + seq + 1).to(tl.int64) > q_row
        wait_for_previous(USE_PDL)
        offs_d = tl.arange(0, BLOCK_D)
        d_mask = offs_d < HEAD_DIM
        first = (seq * tl.num_programs(1) + head).to(tl.int64) * num_splits
        offs_s = tl.arange(0, BLOCK_S)
        lse = tl.load(part_lse_ptr + first + offs_s, mask=offs_s < num_splits, other=float("-inf"))
        # Empty splits have lse = -inf and weigh nothing; a padding sequence has only those and gets zeros.
        lse_max = tl.max(lse, 0)
        lse_max = tl.where(lse_max == float("-inf"), 0.0, lse_max)
        total = tl.sum(tl.exp2(lse - lse_max), 0)
        total = tl.where(total == 0.0, 1.0, total)
        # Partial outputs are summed CHUNK_S splits at a time, so a long split list stays in registers.
        out = tl.zeros([BLOCK_D], dtype=tl.float32)
        for c in tl.static_range(0, BLOCK_S, CHUNK_S):
            offs_c = c + tl.arange(0, CHUNK_S)
            c_mask = offs_c < num_splits
            weight = tl.exp2(tl.load(part_lse_ptr + first + offs_c, mask=c_mask, other=float("-inf")) - lse_max)
            o_mask = c_mask[:, None] & d_mask[None, :]
            o = tl.load(part_o_ptr + (first + offs_c)[:, None] * HEAD_DIM + offs_d[None, :], mask=o_mask, other=0.0)
            out += tl.sum(o * weight[:, None], 0)
        out = out / total
        dst = out_ptr + q_row * stride_ot + head * stride_oh + offs_d
        tl.store(dst, out.to(out_ptr.dtype.element_ty), mask=offs_d < tl.where(has_query, HEAD_DIM, 0))


# Triton's interpreter replaces the kernels when this is set (it must be set before this module is imported).
_LOG2E = 1.4426950408889634


@dataclass(frozen=True)
class DecodeConfig:
    """Launch of the decode path: key tile, warps, Triton's software-pipelining depth, how many programs per SM
    the split count aims for (rounded up, or with whole_waves down, so that no partly filled extra wave of
    programs follows), and (FP8/INT8 cache with bf16 queries) whether the dot products run in fp16 instead of
    bf16."""

    block_n: int = 64
    num_warps: int = 4
    num_stages: int = 3
    programs_per_sm: int = 2
    whole_waves: bool = False
    f16_dot: bool = False


# Per KV-cache element size in bytes (2: bf16/fp16, 1: FP8/INT8), the best geometric mean of a sweep on an H100
# at the Llama-3.1-8B heads (batch 1 at 32K and 128K keys, batch 8 at 32K; benchmarks/decode_attention.py).
# An FP8 tile of 128 keys holds the bytes of a bf16 tile of 64, and 2 programs per SM is what fits at once.
DECODE_CONFIGS: dict[int, DecodeConfig] = {
    2: DecodeConfig(block_n=128, num_stages=2, programs_per_sm=2, whole_waves=True),
    1: DecodeConfig(block_n=128, num_stages=2, programs_per_sm=2, whole_waves=True, f16_dot=True),
}


@functools.cache
def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1


def _decode_splits(num_seqs: int, num_kv_heads: int, max_context: int, device: torch.device, cfg: DecodeConfig) -> int:
    """Splits of the key range per (sequence, kv head) in the decode path, from host-known shapes only.

    About `programs_per_sm` programs per SM, but no split shorter than 256 keys of the longest context the
    block table can address (for a CUDA graph that is the capture-time width, so replays stay valid)."""
    programs = num_seqs * num_kv_heads
    target = cfg.programs_per_sm * _sm_count(device)
    wanted = target // programs if cfg.whole_waves else triton.cdiv(target, programs)
    return max(1, min(wanted, triton.cdiv(max_context, 256), 128))


def paged_attention_triton(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    seq_lens: torch.Tensor,
    block_tables: torch.Tensor,
    scale: float,
    max_seqlen_q: int,
    *,
    block_m: int | None = None,
    block_n: int | None = None,
    num_splits: int | None = None,
    decode_config: DecodeConfig | None = None,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """Same contract as paged_attention_ref, plus max_seqlen_q (host int, >= every sequence's q_len): it sizes
    the prefill grid, and 1 selects the decode path. block_m, block_n, num_splits and decode_config override
    the tile sizes, the decode split count and the decode launch (tests and tuning). Output rows past
    cu_seqlens_q[-1] are left unset."""
    kv_quant = k_cache.dtype in (torch.float8_e4m3fn, torch.int8)
    assert kv_quant or q.dtype == k_cache.dtype == v_cache.dtype, "q and a float KV cache must share a dtype"
    assert not kv_quant or (k_scale is not None and v_scale is not None), "a quantized KV cache needs its scales"
    if not kv_quant:
        k_scale = v_scale = seq_lens  # not read
    assert k_cache.stride() == v_cache.stride() and k_cache.stride(-1) == 1 and q.stride(-1) == 1
    num_seqs = seq_lens.shape[0]
    num_heads = q.shape[1]
    _, block_size, num_kv_heads, head_dim = k_cache.shape
    group = num_heads // num_kv_heads
    block_d = max(triton.next_power_of_2(head_dim), 16)
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    if num_seqs == 0:  # no programs to launch (and no split count to compute)
        return out
    qk_scale = scale * _LOG2E
    common = dict(BLOCK_SIZE=block_size, HEAD_DIM=head_dim, BLOCK_D=block_d, UPCAST=INTERPRETED, KV_QUANT=kv_quant)
    cache_strides = (k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), block_tables.stride(0))

    if max_seqlen_q > 1:
        # 64 x 64 tiles with 4 warps were the best or close to it on an H100 for head_dim 64 and 128, from
        # batches of short prompts to 2048-token chunks after a long cached prefix.
        block_m = block_m or 64
        block_n = block_n or 64
        grid = (triton.cdiv(max_seqlen_q, block_m), num_seqs, num_heads)
        _prefill_kernel[grid](
            q, k_cache, v_cache, out, cu_seqlens_q, seq_lens, block_tables, k_scale, v_scale, qk_scale,
            q.stride(0), q.stride(1), out.stride(0), out.stride(1), *cache_strides,
            GROUP=group, BLOCK_M=block_m, BLOCK_N=block_n, **common,
            num_warps=4, num_stages=2,
        )  # fmt: skip
        return out

    cfg = decode_config or DECODE_CONFIGS.get(k_cache.element_size(), DecodeConfig())
    cfg = replace(cfg, block_n=block_n or cfg.block_n)
    if num_splits is None:
        max_context = block_tables.shape[1] * block_size
        num_splits = _decode_splits(num_seqs, num_kv_heads, max_context, q.device, cfg)
    # The M dimension of a dot is at least 16: pad the group of query heads.
    block_g = max(triton.next_power_of_2(group), 16)
    if num_splits > 1:
        part_o = torch.empty((num_seqs, num_heads, num_splits, head_dim), dtype=torch.float32, device=q.device)
        part_lse = torch.empty((num_seqs, num_heads, num_splits), dtype=torch.float32, device=q.device)
    else:
        part_o = part_lse = out  # not touched without SPLIT
    pdl = pdl_options(q.device)
    _decode_kernel[(num_seqs, num_kv_heads, num_splits)](
        q, k_cache, v_cache, out, part_o, part_lse, cu_seqlens_q, seq_lens, block_tables, k_scale, v_scale,
        qk_scale,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1), *cache_strides, num_heads,
        GROUP=group, BLOCK_G=block_g, BLOCK_N=cfg.block_n, SPLIT=num_splits > 1, **common,
        F16_DOT=cfg.f16_dot and kv_quant and q.dtype == torch.bfloat16,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages, **pdl,
    )  # fmt: skip
    if num_splits > 1:
        block_s = triton.next_power_of_2(num_splits)
        _reduce_splits_kernel[(num_seqs, num_heads)](
            part_o, part_lse, out, cu_seqlens_q, out.stride(0), out.stride(1), num_splits,
            BLOCK_S=block_s, CHUNK_S=min(block_s, 16), HEAD_DIM=head_dim,
            BLOCK_D=block_d, num_warps=4, **pdl,
        )  # fmt: skip
    return out


def paged_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    seq_lens: torch.Tensor,
    block_tables: torch.Tensor,
    scale: float,
    *,
    max_seqlen_q: int | None = None,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """paged_attention_ref's contract. max_seqlen_q (host int) sizes the Triton grid; without it every query
        row is assumed to be possibly one sequence's, which is correct but slower. An FP8/INT8 cache is read through
    its per-KV-head k_scale / v_scale."""
    if use_triton(q):
        bound = q.shape[0] if max_seqlen_q is None else max_seqlen_q
        return paged_attention_triton(q, k_cache, v_cache, cu_seqlens_q, seq_lens, block_tables, scale, bound,
                                      k_scale=k_scale, v_scale=v_scale)  # fmt: skip
    return paged_attention_ref(q, k_cache, v_cache, cu_seqlens_q, seq_lens, block_tables, scale, k_scale, v_scale)
