"""Plain-torch reference of the decode GEMVs that absorb the small kernel before them: RMSNorm (with the
residual add) before q|k|v and gate|up, and the gated SiLU before down; and of the plain one (the output
projection)."""

import torch
import torch.nn.functional as F

from slimserve.kernels.activation_ref import silu_and_mul_ref
from slimserve.kernels.norm_ref import rms_norm_ref


def norm_gemv_ref(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    norm_weight: torch.Tensor,
    eps: float,
    residual: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(linear(rms_norm(x + residual)), x + residual); without a residual the second output is x."""
    if residual is None:
        return F.linear(rms_norm_ref(x, norm_weight, eps), weight, bias), x
    normed, new_residual = rms_norm_ref(x, norm_weight, eps, residual)
    return F.linear(normed, weight, bias), new_residual


def silu_mul_gemv_ref(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """linear(silu(gate) * up) for x = cat(gate, up)."""
    return F.linear(silu_and_mul_ref(x), weight, bias)


def gemv_ref(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """linear(x)."""
    return F.linear(x, weight, bias)
