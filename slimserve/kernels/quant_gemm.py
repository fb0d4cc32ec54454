"""Quantized GEMMs in Triton, beside the plain-torch reference in quant_gemm_ref.py.

One kernel, its weight format and activation type chosen at compile time:
- A16 (W4A16, W8A16, FP8 weights with bf16 activations): each K tile of packed codes is loaded once,
  unpacked in registers (shift and mask), dequantized with its group's scale (and zero point) and fed to a
  tensor-core dot with the activations; fp32 accumulation.
- A8 (W4A8, block-FP8 W8A8): FP8 activations times INT4 codes (exact in E4M3) or FP8 weights, one dot per
  group, each partial product scaled by its weight group's scale and its token group's scale.

Two launch shapes: up to 16 tokens (decode) the GEMM is a GEMV bound by the weight bytes, so programs take
narrow column tiles and split K (partial sums in fp32, added by the host) until the grid fills the GPU
twice over; beyond that, 64/128-row tiles without splitting, where the dot dominates."""

from __future__ import annotations

import functools

import torch

from slimserve.kernels.dispatch import HAS_TRITON, INTERPRETED, use_triton
from slimserve.kernels.quant_gemm_ref import QuantWeight, quant_gemm_ref

if HAS_TRITON:
    import triton
    import triton.language as tl

    from slimserve.kernels.common import dot as _dot

    @triton.jit
    def _quant_gemm_kernel(
        x_ptr,
        w_ptr,
        s_ptr,
        z_ptr,
        xs_ptr,
        out_ptr,
        M,
        N,
        K,
        k_per_split,
        stride_xm,
        stride_wn,
        stride_sn,
        stride_zn,
        stride_xsm,
        stride_om,
        stride_os,
        BITS: tl.constexpr,
        W_FP8: tl.constexpr,
        A_FP8: tl.constexpr,
        HAS_ZERO: tl.constexpr,
        GROUP: tl.constexpr,
        SCALE_BLOCK_N: tl.constexpr,
        X_GROUP: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
        SPLIT: tl.constexpr,
        UPCAST: tl.constexpr,
    ):
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
        pid_k = tl.program_id(2)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        m_mask = offs_m < M
        n_mask = offs_n < N
        rows_w = offs_n.to(tl.int64)
        k_lo = pid_k * k_per_split
        k_hi = tl.minimum(k_lo + k_per_split, K)
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for k0 in range(k_lo, k_hi, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            k_mask = offs_k < K
            x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :], mask=m_mask[:, None] & k_mask[None, :],
                        other=0.0)  # fmt: skip
            if W_FP8:
                w = tl.load(w_ptr + rows_w[:, None] * stride_wn + offs_k[None, :],
                            mask=n_mask[:, None] & k_mask[None, :], other=0.0)  # fmt: skip
            else:
                PER_WORD: tl.constexpr = 32 // BITS
                offs_w = k0 // PER_WORD + tl.arange(0, BLOCK_K // PER_WORD)
                w_mask = n_mask[:, None] & (offs_w < tl.cdiv(K, PER_WORD))[None, :]
                words = tl.load(w_ptr + rows_w[:, None] * stride_wn + offs_w[None, :], mask=w_mask, other=0)
                shifts = tl.arange(0, PER_WORD) * BITS
                codes = (words[:, :, None] >> shifts[None, None, :]) & ((1 << BITS) - 1)
                codes = tl.reshape(codes, (BLOCK_N, BLOCK_K))
            g = k0 // GROUP
            s = tl.load(s_ptr + (offs_n // SCALE_BLOCK_N) * stride_sn + g, mask=n_mask, other=0.0).to(tl.float32)
            if A_FP8:
                if W_FP8:
                    wq = w
                else:
                    wq = (codes - (1 << (BITS - 1))).to(tl.float16).to(x.dtype)
                part = _dot(x, tl.trans(wq), UPCAST)
                xs = tl.load(xs_ptr + offs_m * stride_xsm + k0 // X_GROUP, mask=m_mask, other=0.0)
                acc += part * xs[:, None] * s[None, :]
            else:
                if W_FP8:
                    wf = w.to(tl.float32) * s[:, None]
                else:
                    if HAS_ZERO:
                        z = tl.load(z_ptr + offs_n * stride_zn + g, mask=n_mask, other=0.0).to(tl.float32)
                        wf = (codes.to(tl.float32) - z[:, None]) * s[:, None]
                    else:
                        wf = (codes - (1 << (BITS - 1))).to(tl.float32) * s[:, None]
                acc += _dot(x, tl.trans(wf.to(x.dtype)), UPCAST)
        out_mask = m_mask[:, None] & n_mask[None, :]
        dst = out_ptr + pid_k * stride_os + offs_m[:, None] * stride_om + offs_n[None, :]
        if SPLIT:
            tl.store(dst, acc, mask=out_mask)
        else:
            tl.store(dst, acc.to(out_ptr.dtype.element_ty), mask=out_mask)


GEMV_MAX_M = 16


@functools.cache
def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1


def _largest_tile(limit: int, cap: int) -> int:
    """The largest power of two <= cap (>= 16) that divides `limit` (a group size), or cap if the group spans K."""
    tile = cap
    while tile > 16 and limit % tile:
        tile //= 2
    return tile


def quant_gemm_triton(
    x: torch.Tensor,
    w: QuantWeight,
    x_scale: torch.Tensor | None = None,
    out_dtype: torch.dtype | None = None,
    *,
    block_m: int | None = None,
    block_n: int | None = None,
    block_k: int | None = None,
    split_k: int | None = None,
) -> torch.Tensor:
    """quant_gemm_ref's contract; block sizes and the split count override the heuristics (tests, tuning)."""
    m, k = x.shape
    n = w.out_features
    out_dtype = out_dtype or (torch.bfloat16 if x_scale is not None else x.dtype)
    out = torch.empty((m, n), dtype=out_dtype, device=x.device)
    if m == 0:
        return out
    assert x.stride(-1) == 1 and k == w.in_features
    # A K tile must stay inside one weight group (and one activation group in A8).
    limits = [w.group_size] if w.group_size < k else []
    x_group = k
    if x_scale is not None:
        x_group = triton.cdiv(k, x_scale.shape[1])
        if x_group < k:
            limits.append(x_group)
    gemv = m <= GEMV_MAX_M
    cap = block_k or (128 if gemv else 64)
    for limit in limits:
        cap = _largest_tile(limit, cap)
    block_k = cap
    if gemv:
        block_m, block_n = block_m or 16, block_n or 64
    else:
        block_m, block_n = block_m or (64 if m <= 64 else 128), block_n or 128
    grid_mn = triton.cdiv(m, block_m) * triton.cdiv(n, block_n)
    k_tiles = triton.cdiv(k, block_k)
    if split_k is None:
        split_k = min(k_tiles, max(1, triton.cdiv(2 * _sm_count(x.device), grid_mn))) if gemv else 1
    k_per_split = triton.cdiv(k_tiles, split_k) * block_k
    split_k = triton.cdiv(k, k_per_split)
    target = torch.empty((split_k, m, n), dtype=torch.float32, device=x.device) if split_k > 1 else out
    zeros = w.zeros if w.zeros is not None else w.scales
    xs = x_scale if x_scale is not None else w.scales
    _quant_gemm_kernel[(triton.cdiv(m, block_m), triton.cdiv(n, block_n), split_k)](
        x, w.qweight, w.scales, zeros, xs, target, m, n, k, k_per_split,
        x.stride(0), w.qweight.stride(0), w.scales.stride(0), zeros.stride(0), xs.stride(0),
        target.stride(-2), target.stride(0) if split_k > 1 else 0,
        BITS=w.bits, W_FP8=w.is_fp8, A_FP8=x_scale is not None, HAS_ZERO=w.zeros is not None,
        GROUP=min(w.group_size, k), SCALE_BLOCK_N=w.block_n, X_GROUP=x_group,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, SPLIT=split_k > 1, UPCAST=INTERPRETED,
        num_warps=4, num_stages=4 if gemv else 3,
    )  # fmt: skip
    if split_k > 1:
        torch.sum(target, 0, out=out) if out_dtype == torch.float32 else out.copy_(target.sum(0))
    return out


def quant_gemm(
    x: torch.Tensor, w: QuantWeight, x_scale: torch.Tensor | None = None, out_dtype: torch.dtype | None = None
) -> torch.Tensor:
    """quant_gemm_ref's contract: the Triton kernel on CUDA, the reference elsewhere."""
    if use_triton(x):
        return quant_gemm_triton(x, w, x_scale, out_dtype)
    return quant_gemm_ref(x, w, x_scale, out_dtype)
