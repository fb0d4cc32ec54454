"""Rotary position embedding ("rotate half" layout) in Triton, beside rotary_ref.py."""

import torch

from slimserve.kernels.dispatch import HAS_TRITON, use_triton
from slimserve.kernels.rotary_ref import apply_rotary_ref

if HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _rotate_heads(
        x_ptr,
        out_ptr,
        stride_h,
        stride_out_h,
        cos,
        sin,
        num_heads,
        HALF: tl.constexpr,
        BLOCK_H: tl.constexpr,
        BLOCK_HALF: tl.constexpr,
    ):
        offs_h = tl.arange(0, BLOCK_H)
        offs_d = tl.arange(0, BLOCK_HALF)
        mask = (offs_h < num_heads)[:, None] & (offs_d < HALF)[None, :]
        first = x_ptr + offs_h[:, None] * stride_h + offs_d[None, :]
        x1 = tl.load(first, mask=mask, other=0.0).to(tl.float32)
        x2 = tl.load(first + HALF, mask=mask, other=0.0).to(tl.float32)
        dst = out_ptr + offs_h[:, None] * stride_out_h + offs_d[None, :]
        tl.store(dst, (x1 * cos - x2 * sin).to(out_ptr.dtype.element_ty), mask=mask)
        tl.store(dst + HALF, (x2 * cos + x1 * sin).to(out_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _rotary_kernel(
        q_ptr,
        k_ptr,
        q_out_ptr,
        k_out_ptr,
        pos_ptr,
        cos_sin_ptr,
        stride_qt,
        stride_qh,
        stride_kt,
        stride_kh,
        stride_q_out_t,
        stride_q_out_h,
        stride_k_out_t,
        stride_k_out_h,
        stride_cos_sin,
        num_q_heads,
        num_k_heads,
        HALF: tl.constexpr,
        BLOCK_HQ: tl.constexpr,
        BLOCK_HK: tl.constexpr,
        BLOCK_HALF: tl.constexpr,
    ):
        # One program per token: its cos/sin row is read once and applied to every q and k head.
        t = tl.program_id(0).to(tl.int64)
        pos = tl.load(pos_ptr + t).to(tl.int64)
        offs_d = tl.arange(0, BLOCK_HALF)
        d_mask = offs_d < HALF
        cos = tl.load(cos_sin_ptr + pos * stride_cos_sin + offs_d, mask=d_mask, other=0.0).to(tl.float32)
        sin = tl.load(cos_sin_ptr + pos * stride_cos_sin + HALF + offs_d, mask=d_mask, other=0.0).to(tl.float32)
        cos, sin = cos[None, :], sin[None, :]
        _rotate_heads(
            q_ptr + t * stride_qt,
            q_out_ptr + t * stride_q_out_t,
            stride_qh,
            stride_q_out_h,
            cos,
            sin,
            num_q_heads,
            HALF,
            BLOCK_HQ,
            BLOCK_HALF,
        )
        _rotate_heads(
            k_ptr + t * stride_kt,
            k_out_ptr + t * stride_k_out_t,
            stride_kh,
            stride_k_out_h,
            cos,
            sin,
            num_k_heads,
            HALF,
            BLOCK_HK,
            BLOCK_HALF,
        )


def apply_rotary_triton(
    q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos_sin_cache: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Same contract as apply_rotary_ref, in one launch for q and k. q and k may be strided views (of a fused
    qkv projection, say) as long as their last dim is contiguous; the outputs are new contiguous tensors."""
    assert q.stride(-1) == 1 and k.stride(-1) == 1 and cos_sin_cache.stride(-1) == 1
    num_tokens, num_q_heads, head_dim = q.shape
    num_k_heads = k.shape[1]
    half = head_dim // 2
    q_out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    k_out = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    _rotary_kernel[(num_tokens,)](
        q,
        k,
        q_out,
        k_out,
        positions,
        cos_sin_cache,
        q.stride(0),
        q.stride(1),
        k.stride(0),
        k.stride(1),
        q_out.stride(0),
        q_out.stride(1),
        k_out.stride(0),
        k_out.stride(1),
        cos_sin_cache.stride(0),
        num_q_heads,
        num_k_heads,
        HALF=half,
        BLOCK_HQ=triton.next_power_of_2(num_q_heads),
        BLOCK_HK=triton.next_power_of_2(num_k_heads),
        BLOCK_HALF=triton.next_power_of_2(half),
        num_warps=4,
    )
    return q_out, k_out


def apply_rotary(
    q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos_sin_cache: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    if use_triton(q):
        return apply_rotary_triton(q, k, positions, cos_sin_cache)
    return apply_rotary_ref(q, k, positions, cos_sin_cache)
