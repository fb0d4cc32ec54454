"""Plain-torch reference of RMSNorm, optionally fused with the residual add that precedes it."""

import torch


def rms_norm_ref(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """RMSNorm over the last dim, computed in fp32 like transformers' LlamaRMSNorm.

    With `residual`, returns (norm(x + residual), x + residual): the sum is the next residual stream.
    """
    if residual is not None:
        x = (x.float() + residual.float()).to(x.dtype)
        new_residual = x
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    out = weight * h.to(x.dtype)
    return out if residual is None else (out, new_residual)
