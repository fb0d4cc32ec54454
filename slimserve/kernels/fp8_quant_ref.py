"""Plain-torch reference of FP8 activation quantization (the oracle of fp8_quant.py and the CPU path):
dynamic per token or per (token, group of inputs), or static with one calibrated scale."""

from __future__ import annotations

import torch

FP8_MAX = 448.0
MIN_SCALE = 1e-12  # an all-zero row quantizes to zeros with any positive scale


def quantize_fp8_ref(
    x: torch.Tensor, group_size: int | None = None, static_scale: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] -> (FP8 values [M, K], fp32 scales [M, G]) with x ~= values * scales (G = 1 per token,
    K / group_size per group). A static scale (one element) is used as is, for every row."""
    m, k = x.shape
    xf = x.float()
    if static_scale is not None:
        scale = static_scale.float().reshape(1, 1).expand(m, 1).contiguous()
        group = k
    else:
        group = group_size or k
        amax = torch.nn.functional.pad(xf.abs(), (0, -k % group)).view(m, -1, group).amax(-1)
        scale = (amax / FP8_MAX).clamp_min(MIN_SCALE)
    full = scale.repeat_interleave(group, 1)[:, :k]
    q = (xf / full).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return q, scale
