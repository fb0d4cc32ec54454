"""Dequantizing GEMV for 2-, 3- and 4-bit group-quantized weights (batch-1 decode is memory-bound: reading
2 bits per weight instead of 16 is the whole speedup), beside lowbit_gemv_ref.py.

Weights are compressed-tensors' dense "pack-quantized" words: code j of row n sits at bits [j*bits, (j+1)*bits)
of the row's int32 stream (a 3-bit code may straddle two words). Each program owns BLOCK_N output rows and one
of SPLIT_K slices of the input; every tile of BLOCK_K columns lies inside one quantization group, so the tile's
dot product is sum(q * x) - zero * sum(x), scaled once. The SPLIT_K partial sums go to a float32 buffer that
one reduction adds up (deterministic, unlike atomics)."""

import torch

from slimserve.kernels.dispatch import HAS_TRITON, use_triton
from slimserve.kernels.lowbit_gemv_ref import lowbit_gemv_ref

if HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _lowbit_gemv_kernel(
        x_ptr,
        w_ptr,
        s_ptr,
        z_ptr,
        out_ptr,
        N,
        K,
        stride_xm,
        stride_wn,
        stride_sn,
        stride_zn,
        stride_os,
        stride_om,
        k_per_split,
        BITS: tl.constexpr,
        GROUP: tl.constexpr,
        HAS_ZERO: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
    ):
        pid_n, pid_k, m = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        row_ok = rows < N
        rows64 = rows.to(tl.int64)
        acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
        k_start = pid_k * k_per_split
        for k0 in range(k_start, k_start + k_per_split, BLOCK_K):
            cols = k0 + tl.arange(0, BLOCK_K)
            col_ok = cols < K
            x = tl.load(x_ptr + m * stride_xm + cols, mask=col_ok, other=0.0).to(tl.float32)
            bitpos = cols * BITS
            word, shift = bitpos // 32, bitpos % 32
            mask2 = row_ok[:, None] & col_ok[None, :]
            ptrs = w_ptr + rows64[:, None] * stride_wn + word[None, :]
            lo = tl.load(ptrs, mask=mask2, other=0).to(tl.uint32, bitcast=True)
            val = lo >> shift[None, :].to(tl.uint32)
            if 32 % BITS != 0:
                # Codes that straddle a word boundary take their high bits from the next word.
                straddle = (shift + BITS) > 32
                hi = tl.load(ptrs + 1, mask=mask2 & straddle[None, :], other=0).to(tl.uint32, bitcast=True)
                val = val | (hi << tl.where(straddle, 32 - shift, 0)[None, :].to(tl.uint32))
            q = (val & ((1 << BITS) - 1)).to(tl.float32) - (1 << (BITS - 1))
            part = tl.sum(q * x[None, :], axis=1)
            g = k0 // GROUP
            scale = tl.load(s_ptr + rows64 * stride_sn + g, mask=row_ok, other=0.0).to(tl.float32)
            if HAS_ZERO:
                zero = tl.load(z_ptr + rows64 * stride_zn + g, mask=row_ok, other=0.0).to(tl.float32)
                part = part - zero * tl.sum(x, axis=0)
            acc += part * scale
        tl.store(out_ptr + pid_k * stride_os + m * stride_om + rows, acc, mask=row_ok)


def _split_k(k: int, block_k: int, n_blocks: int, split_k: int | None) -> int:
    """Enough programs to fill the GPU (about 4 per SM on an H100) without slicing K below one tile."""
    tiles = triton.cdiv(k, block_k)
    if split_k is None:
        split_k = max(1, min(tiles, 528 // max(n_blocks, 1)))
    return max(1, min(split_k, tiles))


def lowbit_gemv_triton(
    x: torch.Tensor,
    packed: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor | None,
    bits: int,
    group_size: int,
    bias: torch.Tensor | None = None,
    *,
    block_n: int = 32,
    block_k: int | None = None,
    split_k: int | None = None,
) -> torch.Tensor:
    """x (..., K) times the (N, K) quantized weight: (..., N) in x's dtype. Meant for a few rows of x."""
    k = x.shape[-1]
    n = packed.shape[0]
    block_k = block_k or min(group_size, 128)
    if group_size % block_k:
        raise ValueError(f"BLOCK_K {block_k} must divide the group size {group_size}")
    x2 = x.reshape(-1, k)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    m = x2.shape[0]
    n_blocks = triton.cdiv(n, block_n)
    splits = _split_k(k, block_k, n_blocks, split_k)
    tiles_per_split = triton.cdiv(triton.cdiv(k, block_k), splits)
    splits = triton.cdiv(triton.cdiv(k, block_k), tiles_per_split)
    partial = torch.empty(splits, m, n, dtype=torch.float32, device=x.device)
    z = zero if zero is not None else scale  # never read without HAS_ZERO
    _lowbit_gemv_kernel[(n_blocks, splits, m)](
        x2,
        packed,
        scale,
        z,
        partial,
        n,
        k,
        x2.stride(0),
        packed.stride(0),
        scale.stride(0),
        z.stride(0),
        partial.stride(0),
        partial.stride(1),
        tiles_per_split * block_k,
        BITS=bits,
        GROUP=group_size,
        HAS_ZERO=zero is not None,
        BLOCK_N=block_n,
        BLOCK_K=block_k,
        num_warps=4,
    )
    out = partial[0] if splits == 1 else partial.sum(0)
    if bias is not None:
        out = out + bias.float()
    return out.to(x.dtype).reshape(*x.shape[:-1], n)


def lowbit_gemv(
    x: torch.Tensor,
    packed: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor | None,
    bits: int,
    group_size: int,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    if use_triton(x):
        return lowbit_gemv_triton(x, packed, scale, zero, bits, group_size, bias)
    return lowbit_gemv_ref(x, packed, scale, zero, bits, group_size, bias)
