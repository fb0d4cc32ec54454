"""Fused mixture-of-experts MLP in Triton, beside fused_moe_ref.py.

The (token, expert) pairs are sorted by expert and each expert's run is padded to a multiple of BLOCK_M,
so every M-block of the sorted list belongs to one expert. Two launches of one grouped GEMM then cover
all experts: gate|up with the SiLU gate fused into its epilogue, and down with the routing weight fused
into its epilogue; a sum over the k pairs of each token finishes. Every size is fixed by the shapes
alone (no host sync), so the whole layer runs inside a CUDA graph.

FP8 expert weights are loaded as FP8 (half the bytes of bf16) and their per-output-channel scales applied
in the epilogue. Weight-only, each tile is widened to the activations' dtype for the dot; with FP8
activations (quantized per token, or per pair with each expert's static scale, before each GEMM) the dot
takes FP8 on both sides (the FP8 tensor cores on Hopper) and the epilogue also applies the row's scale.
"""

from dataclasses import dataclass

import torch

from slimserve.kernels.dispatch import HAS_TRITON, INTERPRETED, use_triton
from slimserve.kernels.fp8_quant import quantize_fp8
from slimserve.kernels.fp8_quant_ref import FP8_MAX
from slimserve.kernels.fused_moe_ref import Fp8ExpertScales, fused_moe_ref

if HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _dot(a, w, acc, IEEE: tl.constexpr, UPCAST: tl.constexpr):
        if UPCAST:  # the CPU interpreter keeps bf16 and FP8 as raw integers and cannot multiply them
            a = a.to(tl.float32)
            w = w.to(tl.float32)
        if IEEE:
            return tl.dot(a, w, acc, input_precision="ieee")
        return tl.dot(a, w, acc)

    @triton.jit
    def _accumulate(a, w, acc, FP8: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr):
        """acc + a @ w. Hopper's FP8 tensor cores accumulate with fewer bits than fp32: FP8 products of each
        K step go into a fresh accumulator that is then added in fp32, rather than accumulating across K."""
        if FP8:
            return acc + _dot(a, w, tl.zeros_like(acc), IEEE, UPCAST)
        return _dot(a, w, acc, IEEE, UPCAST)

    @triton.jit
    def _grouped_gemm_kernel(
        a_ptr,
        w_ptr,
        out_ptr,
        weights_ptr,
        sorted_pairs_ptr,
        block_expert_ptr,
        a_scale_ptr,  # A_FP8: one fp32 scale per row of A
        w_scale_ptr,  # W_FP8: one fp32 scale per (expert, output channel), gate|up channels for GATED
        num_pairs,
        N,
        K,
        stride_am,
        stride_we,
        stride_wn,
        stride_om,
        stride_wse,
        A_ROWS_PER_PAIR: tl.constexpr,  # top_k when A holds one row per token, 1 when one row per pair
        GATED: tl.constexpr,  # W holds gate rows [0, N) and up rows [N, 2N): out = silu(a W_g^T) * (a W_u^T)
        APPLY_WEIGHT: tl.constexpr,  # scale each output row by its pair's routing weight
        A_FP8: tl.constexpr,
        W_FP8: tl.constexpr,
        IEEE: tl.constexpr,  # fp32 inputs: exact fp32 products rather than tf32
        UPCAST: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
    ):
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
        expert = tl.load(block_expert_ptr + pid_m).to(tl.int64)
        if expert < 0:  # a block past the end of the padded list
            return
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        pair = tl.load(sorted_pairs_ptr + offs_m)
        valid = pair < num_pairs  # padding slots hold num_pairs
        row = (pair // A_ROWS_PER_PAIR).to(tl.int64)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        n_mask = offs_n < N
        offs_k = tl.arange(0, BLOCK_K)
        a_ptrs = a_ptr + row[:, None] * stride_am + offs_k[None, :]
        w_ptrs = w_ptr + expert * stride_we + offs_n[None, :].to(tl.int64) * stride_wn + offs_k[:, None]
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            k_mask = offs_k < K - k0
            a = tl.load(a_ptrs, mask=valid[:, None] & k_mask[None, :], other=0.0)
            w = tl.load(w_ptrs, mask=k_mask[:, None] & n_mask[None, :], other=0.0)
            if W_FP8 and not A_FP8 and not UPCAST:  # weight-only: widen FP8 (exact) to the activations' dtype
                w = w.to(a.dtype)
            acc = _accumulate(a, w, acc, A_FP8, IEEE, UPCAST)
            if GATED:
                w_up = tl.load(w_ptrs + N * stride_wn, mask=k_mask[:, None] & n_mask[None, :], other=0.0)
                if W_FP8 and not A_FP8 and not UPCAST:
                    w_up = w_up.to(a.dtype)
                acc_up = _accumulate(a, w_up, acc_up, A_FP8, IEEE, UPCAST)
            a_ptrs += BLOCK_K
            w_ptrs += BLOCK_K
        if W_FP8:  # per-output-channel weight scales, then the row's activation scale
            ws_ptrs = w_scale_ptr + expert * stride_wse + offs_n
            acc = acc * tl.load(ws_ptrs, mask=n_mask, other=0.0)[None, :]
            if GATED:
                acc_up = acc_up * tl.load(ws_ptrs + N, mask=n_mask, other=0.0)[None, :]
        if A_FP8:
            a_s = tl.load(a_scale_ptr + row, mask=valid, other=0.0)[:, None]
            acc = acc * a_s
            if GATED:
                acc_up = acc_up * a_s
        if GATED:
            acc = acc / (1.0 + tl.exp(-acc)) * acc_up
        if APPLY_WEIGHT:
            acc = acc * tl.load(weights_ptr + pair, mask=valid, other=0.0).to(tl.float32)[:, None]
        out_ptrs = out_ptr + pair[:, None].to(tl.int64) * stride_om + offs_n[None, :]
        tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=valid[:, None] & n_mask[None, :])


@dataclass
class ExpertBlocks:
    """The (token, expert) pairs grouped by expert: sorted_pairs [P] holds pair ids (token * k + slot),
    each expert's run padded with the value num_pairs to a multiple of block_m; block_expert [P / block_m]
    holds the local expert of each block, -1 past the end."""

    sorted_pairs: torch.Tensor
    block_expert: torch.Tensor
    block_m: int


def align_pairs_to_experts(topk_ids: torch.Tensor, num_local: int, expert_start: int, block_m: int) -> ExpertBlocks:
    """Sort the pairs by expert on the device; pairs routed to experts not held here are dropped."""
    num_pairs = topk_ids.numel()
    device = topk_ids.device
    flat = topk_ids.reshape(-1).long() - expert_start
    held = (flat >= 0) & (flat < num_local)
    flat = torch.where(held, flat, num_local)  # dropped pairs go to a virtual expert after the held ones
    counts = torch.zeros(num_local + 1, dtype=torch.long, device=device)
    counts.scatter_add_(0, flat, torch.ones_like(flat))
    padded = (counts[:num_local] + block_m - 1) // block_m * block_m
    padded_ends = padded.cumsum(0)
    # At most min(pairs, experts) experts are non-empty, each padded by fewer than block_m slots.
    capacity = num_pairs + min(num_pairs, num_local) * (block_m - 1)
    capacity = -(-capacity // block_m) * block_m
    order = torch.sort(flat, stable=True).indices
    expert_of_sorted = flat[order]
    run_starts = counts.cumsum(0) - counts
    rank_in_run = torch.arange(num_pairs, device=device) - run_starts[expert_of_sorted]
    padded_starts = torch.cat([padded_ends - padded, padded_ends.new_full((1,), capacity)])
    dest = padded_starts[expert_of_sorted] + rank_in_run
    dest = torch.where(expert_of_sorted < num_local, dest, capacity)  # one spare slot takes the dropped
    sorted_pairs = torch.full((capacity + 1,), num_pairs, dtype=torch.int32, device=device)
    sorted_pairs[dest] = order.to(torch.int32)
    block_starts = torch.arange(0, capacity, block_m, device=device)
    block_expert = torch.searchsorted(padded_ends, block_starts, right=True)
    block_expert = torch.where(block_expert < num_local, block_expert, -1).to(torch.int32)
    return ExpertBlocks(sorted_pairs[:capacity], block_expert, block_m)


def _tile_sizes(num_pairs: int, num_local: int, n: int) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K): small M-blocks when experts get few tokens (decode), large otherwise."""
    per_expert = num_pairs / num_local
    block_m = 16 if per_expert <= 16 else 32 if per_expert <= 48 else 64
    block_n = 64 if block_m < 64 or n < 1024 else 128
    return block_m, block_n, 64


def _grouped_gemm(
    a: torch.Tensor,
    w: torch.Tensor,
    out: torch.Tensor,
    blocks: ExpertBlocks,
    weights: torch.Tensor,
    a_rows_per_pair: int,
    gated: bool,
    block_n: int,
    block_k: int,
    a_scale: torch.Tensor | None = None,
    w_scale: torch.Tensor | None = None,
) -> None:
    n = w.shape[1] // 2 if gated else w.shape[1]
    k = w.shape[2]
    grid = (blocks.block_expert.numel(), triton.cdiv(n, block_n))
    a_fp8, w_fp8 = a_scale is not None, w_scale is not None
    _grouped_gemm_kernel[grid](
        a,
        w,
        out,
        weights,
        blocks.sorted_pairs,
        blocks.block_expert,
        a_scale if a_fp8 else weights,  # unread without FP8 activations
        w_scale if w_fp8 else weights,  # unread without FP8 weights
        weights.numel(),
        n,
        k,
        a.stride(0),
        w.stride(0),
        w.stride(1),
        out.stride(0),
        w_scale.stride(0) if w_fp8 else 0,
        A_ROWS_PER_PAIR=a_rows_per_pair,
        GATED=gated,
        APPLY_WEIGHT=not gated,
        A_FP8=a_fp8,
        W_FP8=w_fp8,
        IEEE=a.dtype == torch.float32,
        UPCAST=INTERPRETED and a.dtype in (torch.bfloat16, torch.float8_e4m3fn),
        BLOCK_M=blocks.block_m,
        BLOCK_N=block_n,
        BLOCK_K=block_k,
        num_warps=4,
        num_stages=3,
    )


def _expert_inputs(
    a: torch.Tensor,
    bank: str,
    scales: Fp8ExpertScales | None,
    rows_per_pair: int,
    topk_ids: torch.Tensor,
    expert_start: int,
) -> tuple[torch.Tensor, torch.Tensor | None, int]:
    """What a GEMM reads as A: (rows, per-row scales or None, A rows per pair). Dynamic activations are
    quantized per row; static ones per pair, each with its expert's scale (so one row per pair)."""
    if scales is None or scales.act is None:
        return a, None, rows_per_pair
    if scales.act == "dynamic":
        q, s = quantize_fp8(a)
        return q, s.reshape(-1), rows_per_pair
    static = scales.input_scale(bank)
    local = (topk_ids.reshape(-1).long() - expert_start).clamp(0, static.numel() - 1)  # others are never read
    s = static.float()[local]
    rows = a if rows_per_pair == 1 else a.repeat_interleave(rows_per_pair, dim=0)
    q = (rows.float() / s[:, None]).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return q, s, 1


def fused_moe_triton(
    x: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    expert_start: int = 0,
    num_experts: int | None = None,
    scales: Fp8ExpertScales | None = None,
) -> torch.Tensor:
    """Same contract as fused_moe_ref: [T, H] summed over each token's experts held here. num_experts is
    the total over all ranks (None: this bank holds them all)."""
    num_tokens, top_k = topk_ids.shape
    num_local, two_i, hidden = w13.shape
    num_pairs = num_tokens * top_k
    if num_pairs == 0:
        return torch.zeros_like(x)
    x = x.contiguous()
    block_m, block_n, block_k = _tile_sizes(num_pairs, num_local, hidden)
    blocks = align_pairs_to_experts(topk_ids, num_local, expert_start, block_m)
    weights = topk_weights.reshape(-1).contiguous()
    w13_scale = None if scales is None else scales.w13_scale
    w2_scale = None if scales is None else scales.w2_scale
    act = torch.empty(num_pairs, two_i // 2, dtype=x.dtype, device=x.device)
    a, a_scale, rows = _expert_inputs(x, "w13", scales, top_k, topk_ids, expert_start)
    _grouped_gemm(a, w13, act, blocks, weights, rows, True, block_n, block_k, a_scale, w13_scale)
    # Pairs routed to experts held elsewhere are never written: they must read as zeros in the sum.
    alloc = torch.empty if num_experts in (None, num_local) else torch.zeros
    per_pair = alloc(num_pairs, hidden, dtype=x.dtype, device=x.device)
    a, a_scale, _ = _expert_inputs(act, "w2", scales, 1, topk_ids, expert_start)
    _grouped_gemm(a, w2, per_pair, blocks, weights, 1, False, block_n, block_k, a_scale, w2_scale)
    return per_pair.view(num_tokens, top_k, hidden).sum(dim=1, dtype=torch.float32).to(x.dtype)


def fused_moe(
    x: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    expert_start: int = 0,
    num_experts: int | None = None,
    scales: Fp8ExpertScales | None = None,
) -> torch.Tensor:
    if use_triton(x):
        return fused_moe_triton(x, w13, w2, topk_weights, topk_ids, expert_start, num_experts, scales)
    return fused_moe_ref(x, w13, w2, topk_weights, topk_ids, expert_start, scales)
