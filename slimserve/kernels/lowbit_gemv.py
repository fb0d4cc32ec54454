"""Dequantizing GEMV for 2-, 3- and 4-bit group-quantized weights (batch-1 decode is memory-bound: reading
2 bits per weight instead of 16 is the whole speedup), beside lowbit_gemv_ref.py.

Weights are compressed-tensors' dense "pack-quantized" words: code j of row n sits at bits [j*bits, (j+1)*bits)
of the row's int32 stream (a 3-bit code may straddle two words). Each program owns BLOCK_N output rows and one
of SPLIT_K slices of the input, read in tiles of BLOCK_K columns inside one quantization group: 2- and 4-bit
tiles load whole contiguous words and shift every code out of them; 3-bit tiles load runs of 3 words (32
codes) and pick each code's word (and the next, for the two codes that straddle a boundary) by its position.
Products accumulate elementwise and are reduced once; the SPLIT_K partial sums go to a float32 buffer that one
reduction adds up (deterministic, unlike atomics)."""

import torch

from slimserve.kernels.dispatch import HAS_TRITON, use_triton
from slimserve.kernels.lowbit_gemv_ref import lowbit_gemv_ref

if HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _unpack_tile(
        w_ptr, rows64, row_ok, stride_wn, k0, BITS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr
    ):
        """Codes [BLOCK_N, BLOCK_K] of columns k0.. (k0 a multiple of 32), as unsigned integers."""
        if 32 % BITS == 0:
            # Whole words: PER_WORD codes each, read as [BLOCK_N, BLOCK_K / PER_WORD] contiguous words.
            PER_WORD: tl.constexpr = 32 // BITS
            WORDS: tl.constexpr = BLOCK_K // PER_WORD
            w = tl.arange(0, WORDS)
            ptrs = w_ptr + rows64[:, None] * stride_wn + (k0 // PER_WORD + w)[None, :]
            words = tl.load(ptrs, mask=row_ok[:, None], other=0).to(tl.uint32, bitcast=True)
            shifts = (tl.arange(0, PER_WORD) * BITS).to(tl.uint32)
            vals = (words[:, :, None] >> shifts[None, None, :]) & ((1 << BITS) - 1)
            return tl.reshape(vals, (BLOCK_N, BLOCK_K))
        else:
            # 32 codes fill BITS words exactly; code j starts at bit BITS * j of its 32-code run.
            RUNS: tl.constexpr = BLOCK_K // 32
            run = tl.arange(0, RUNS)
            j = tl.arange(0, 32)
            bit = j * BITS
            word, shift = bit // 32, (bit % 32).to(tl.uint32)
            straddle = (bit % 32) + BITS > 32
            base = w_ptr + rows64[:, None] * stride_wn + ((k0 // 32 + run) * BITS)[None, :]
            lo = tl.zeros((BLOCK_N, RUNS, 32), dtype=tl.uint32)
            hi = tl.zeros((BLOCK_N, RUNS, 32), dtype=tl.uint32)
            for i in tl.static_range(BITS):
                wi = tl.load(base + i, mask=row_ok[:, None], other=0).to(tl.uint32, bitcast=True)[:, :, None]
                lo = tl.where((word == i)[None, None, :], wi, lo)
                hi = tl.where((word + 1 == i)[None, None, :], wi, hi)
            hi_shift = tl.where(straddle, 32 - shift, 0).to(tl.uint32)
            vals = (lo >> shift[None, None, :]) | tl.where(straddle[None, None, :], hi << hi_shift[None, None, :], 0)
            return tl.reshape(vals & ((1 << BITS) - 1), (BLOCK_N, BLOCK_K))

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
        # Products accumulate elementwise; one reduction over K at the end.
        acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
        k_start = pid_k * k_per_split
        for k0 in range(k_start, tl.minimum(k_start + k_per_split, K), BLOCK_K):
            cols = k0 + tl.arange(0, BLOCK_K)
            x = tl.load(x_ptr + m * stride_xm + cols).to(tl.float32)
            q = _unpack_tile(w_ptr, rows64, row_ok, stride_wn, k0, BITS, BLOCK_N, BLOCK_K).to(tl.float32)
            q = q - (1 << (BITS - 1))
            g = k0 // GROUP
            scale = tl.load(s_ptr + rows64 * stride_sn + g, mask=row_ok, other=0.0).to(tl.float32)
            if HAS_ZERO:
                zero = tl.load(z_ptr + rows64 * stride_zn + g, mask=row_ok, other=0.0).to(tl.float32)
                q = q - zero[:, None]
            acc += q * scale[:, None] * x[None, :]
        tl.store(out_ptr + pid_k * stride_os + m * stride_om + rows, tl.sum(acc, axis=1), mask=row_ok)


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
    num_warps: int = 4,
) -> torch.Tensor:
    """x (..., K) times the (N, K) quantized weight: (..., N) in x's dtype. Meant for a few rows of x."""
    k = x.shape[-1]
    n = packed.shape[0]
    block_k = block_k or min(group_size, 128)
    if group_size % block_k or block_k % 32 or k % group_size:
        raise ValueError(
            f"BLOCK_K {block_k} must be a multiple of 32 dividing the group size {group_size}, which divides K={k}"
        )
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
        num_warps=num_warps,
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
