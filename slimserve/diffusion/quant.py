"""FP8 (W8A8, per-token dynamic activation scales) and INT8 weight-only linear layers for the denoiser's blocks.

On CUDA the FP8 product is one `torch._scaled_mm` with row-wise scales (the scales apply in the GEMM epilogue, so
nothing is dequantized in memory); elsewhere the same numbers go through the plain-torch reference.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from slimserve.diffusion.blocks import repeated_blocks

FP8_MAX = torch.finfo(torch.float8_e4m3fn).max


def quantize_fp8_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row scaled so its largest magnitude is FP8's largest value; returns (fp8 rows, fp32 scale per row)."""
    scale = x.abs().amax(dim=-1, keepdim=True).float().clamp_min(1e-12) / FP8_MAX
    return (x.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn), scale


def fp8_linear_ref(
    x_q: torch.Tensor, x_scale: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """Reference: the product of the dequantized operands in fp32."""
    out = (x_q.float() * x_scale) @ (w_q.float() * w_scale).t()
    return out if bias is None else out + bias.float()


def fp8_linear_cuda(
    x_q: torch.Tensor,
    x_scale: torch.Tensor,
    w_q: torch.Tensor,
    w_scale: torch.Tensor,
    bias: torch.Tensor | None,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    """Row-wise scaled FP8 GEMM: x_scale is (M, 1), w_scale (1, N), both fp32."""
    return torch._scaled_mm(x_q, w_q.t(), scale_a=x_scale, scale_b=w_scale, bias=bias, out_dtype=out_dtype)


class FP8Linear(nn.Module):
    """W8A8 FP8 (e4m3) linear: weights scaled per output channel once, activations per token at run time."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        w_q, w_scale = quantize_fp8_rows(linear.weight.detach())
        self.register_buffer("weight", w_q)
        self.register_buffer("weight_scale", w_scale)
        self.register_buffer("weight_scale_row", w_scale.t().contiguous(), persistent=False)  # (1, N) for the GEMM
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x_q, x_scale = quantize_fp8_rows(x.reshape(-1, shape[-1]))
        if x.is_cuda:
            out = fp8_linear_cuda(x_q, x_scale, self.weight, self.weight_scale_row, self.bias, x.dtype)
        else:
            out = fp8_linear_ref(x_q, x_scale, self.weight, self.weight_scale, self.bias).to(x.dtype)
        return out.reshape(*shape[:-1], self.out_features)


class Int8WeightOnlyLinear(nn.Module):
    """INT8 weights (symmetric, per output channel) times activations in their own dtype: half the weight bytes."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        weight = linear.weight.detach().float()
        scale = weight.abs().amax(dim=1, keepdim=True).clamp_min(1e-12) / 127.0
        self.register_buffer("weight", torch.round(weight / scale).clamp(-127, 127).to(torch.int8))
        self.register_buffer("weight_scale", scale.to(linear.weight.dtype))
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight.to(x.dtype) * self.weight_scale.to(x.dtype), self.bias)


def _fits_fp8_gemm(linear: nn.Linear) -> bool:
    # torch._scaled_mm needs both dimensions divisible by 16.
    return linear.in_features % 16 == 0 and linear.out_features % 16 == 0


def quantize_blocks_(model: nn.Module, scheme: str) -> int:
    """Replace every linear layer inside the repeated blocks (embedders and the output head stay in high precision,
    as in FP8 checkpoints of Flux and SD3); returns how many were replaced."""
    replaced = 0
    for block in repeated_blocks(model):
        for parent in list(block.modules()):
            for name, child in list(parent.named_children()):
                if not isinstance(child, nn.Linear):
                    continue
                if scheme == "fp8" and _fits_fp8_gemm(child):
                    setattr(parent, name, FP8Linear(child))
                elif scheme == "int8":
                    setattr(parent, name, Int8WeightOnlyLinear(child))
                else:
                    continue
                replaced += 1
    return replaced
