"""Dense int32 packing of 4- and 8-bit codes, in compressed-tensors' "pack-quantized" layout: each code is
offset to unsigned (q + 2**(bits-1)) and code i of a row sits at bits [i*bits, (i+1)*bits) of the row's
little-endian stream of int32 words."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from slimserve.compress.errors import QuantConfigError


def _per_word(bits: int) -> int:
    if bits not in (4, 8):
        raise QuantConfigError(f"packing supports 4 or 8 bits, not {bits}")
    return 32 // bits


def pack_int32(q: torch.Tensor, bits: int, dim: int = 1) -> torch.Tensor:
    """Pack int8 codes of a 2-D tensor along `dim` (1: along each row, 0: along each column)."""
    n = _per_word(bits)
    if dim == 0:
        return pack_int32(q.t(), bits).t().contiguous()
    cols = q.shape[1]
    u = q.to(torch.int64) + (1 << (bits - 1))
    u = F.pad(u, (0, math.ceil(cols / n) * n - cols)).view(q.shape[0], -1, n)
    shifts = torch.arange(n, dtype=torch.int64, device=q.device) * bits
    words = (u << shifts).sum(-1)  # fields do not overlap, so the sum is a bitwise or
    words = torch.where(words >= 2**31, words - 2**32, words)  # reinterpret as signed int32
    return words.to(torch.int32)


def unpack_int32(packed: torch.Tensor, bits: int, size: int, dim: int = 1) -> torch.Tensor:
    """Inverse of pack_int32: `size` codes along `dim`, as int8."""
    n = _per_word(bits)
    if dim == 0:
        return unpack_int32(packed.t(), bits, size).t().contiguous()
    words = packed.to(torch.int64) & 0xFFFFFFFF
    shifts = torch.arange(n, dtype=torch.int64, device=packed.device) * bits
    u = (words.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)
    return (u.flatten(1)[:, :size] - (1 << (bits - 1))).to(torch.int8)
