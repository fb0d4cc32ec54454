"""Dense int32 packing of 1- to 8-bit codes, in compressed-tensors' "pack-quantized" layout: each code is
offset to unsigned (q + 2**(bits-1)) and code i of a row sits at bits [i*bits, (i+1)*bits) of the row's
little-endian stream of int32 words (a 3-bit code may straddle two words; a row takes ceil(cols*bits/32))."""

from __future__ import annotations

import math

import torch

from slimserve.compress.errors import QuantConfigError


def _check(bits: int) -> None:
    if not 1 <= bits <= 8:
        raise QuantConfigError(f"packing supports 1 to 8 bits, not {bits}")


def packed_words(cols: int, bits: int) -> int:
    return math.ceil(cols * bits / 32)


def pack_int32(q: torch.Tensor, bits: int, dim: int = 1) -> torch.Tensor:
    """Pack int8 codes of a 2-D tensor along `dim` (1: along each row, 0: along each column)."""
    _check(bits)
    if dim == 0:
        return pack_int32(q.t(), bits).t().contiguous()
    rows, cols = q.shape
    u = q.to(torch.int64) + (1 << (bits - 1))
    pos = torch.arange(cols, dtype=torch.int64, device=q.device) * bits
    word, shift = pos // 32, pos % 32
    n = packed_words(cols, bits)
    # One spare word takes the high parts of codes that straddle the last boundary (always zero: cut below).
    words = torch.zeros(rows, n + 1, dtype=torch.int64, device=q.device)
    low = (u << shift) & 0xFFFFFFFF
    high = u >> (32 - shift)  # the bits that spill into the next word (zero when the code fits)
    # Fields never overlap, so adding them is a bitwise or.
    words.scatter_add_(1, word.expand(rows, -1), low)
    words.scatter_add_(1, (word + 1).expand(rows, -1), high)
    words = words[:, :n]
    words = torch.where(words >= 2**31, words - 2**32, words)  # reinterpret as signed int32
    return words.to(torch.int32)


def unpack_int32(packed: torch.Tensor, bits: int, size: int, dim: int = 1) -> torch.Tensor:
    """Inverse of pack_int32: `size` codes along `dim`, as int8."""
    _check(bits)
    if dim == 0:
        return unpack_int32(packed.t(), bits, size).t().contiguous()
    words = packed.to(torch.int64) & 0xFFFFFFFF
    words = torch.cat([words, torch.zeros_like(words[:, :1])], 1)
    pos = torch.arange(size, dtype=torch.int64, device=packed.device) * bits
    word, shift = pos // 32, pos % 32
    lo = words[:, word] >> shift
    hi = words[:, word + 1] << (32 - shift)
    u = (lo | hi) & ((1 << bits) - 1)
    return (u - (1 << (bits - 1))).to(torch.int8)
