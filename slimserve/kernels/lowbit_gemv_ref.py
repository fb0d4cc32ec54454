"""Reference for lowbit_gemv.py: unpack the dense codes, dequantize ((q - zero) * scale per group) and multiply."""

import torch
import torch.nn.functional as F

from slimserve.compress.quant.packing import unpack_int32


def dequantize_packed(
    packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, bits: int, group_size: int, k: int
) -> torch.Tensor:
    """(N, K) float32 weight from (N, ceil(K*bits/32)) int32 words, (N, K/group) scales and zero points."""
    q = unpack_int32(packed, bits, k).float()
    q = q.unflatten(1, (k // group_size, group_size))
    if zero is not None:
        q = q - zero.float().unsqueeze(-1)
    return (q * scale.float().unsqueeze(-1)).flatten(1)


def lowbit_gemv_ref(
    x: torch.Tensor,
    packed: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor | None,
    bits: int,
    group_size: int,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """x (..., K) @ dequantized weight (N, K)^T (+ bias), in x's dtype (accumulated in float32)."""
    k = x.shape[-1]
    w = dequantize_packed(packed, scale, zero, bits, group_size, k)
    return F.linear(x.float(), w, None if bias is None else bias.float()).to(x.dtype)
