"""Weight-only INT8 and INT4 linears for inference on the CPU, quantized when the model loads.

They call PyTorch's packed CPU kernels, which dequantize inside the matrix product instead of reading a full
float weight: INT8 is symmetric per output channel (`_weight_int8pack_mm`), INT4 asymmetric per group of input
columns in the tiled layout of `_convert_weight_to_int4pack_for_cpu` (`_weight_int4pack_mm_for_cpu`, which
computes (q - 8) * scale + offset). Decode on a laptop-class CPU is bound by the bytes it reads, as on a GPU.

The tied or untied output head is quantized to INT8 in both modes: it is a large share of a small model's
weights, and INT8 leaves its logits all but unchanged."""

from __future__ import annotations

import os

import torch
from torch import nn

from slimserve.errors import SlimserveError
from slimserve.layers.linear import Linear

MODES = ("int8", "int4")
INT4_GROUPS = (128, 64, 32)  # the largest that divides the input width is used
INT4_INNER_K_TILES = 2


def _int8_per_channel(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    w = w.float()
    scale = (w.abs().amax(1) / 127).clamp(min=1e-12)
    return (w / scale[:, None]).round().clamp(-128, 127).to(torch.int8), scale


class Int8CpuLinear(nn.Module):
    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype) -> None:
        super().__init__()
        q, scale = _int8_per_channel(weight)
        self.register_buffer("weight_int8", q)
        self.register_buffer("scale", scale.to(dtype))
        self.register_buffer("bias", None if bias is None else bias.detach().to(dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        y = torch._weight_int8pack_mm(x.reshape(-1, shape[-1]), self.weight_int8, self.scale)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*shape[:-1], y.shape[-1])


class Int4CpuLinear(nn.Module):
    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype) -> None:
        super().__init__()
        n, k = weight.shape
        group = next((g for g in INT4_GROUPS if k % g == 0), None)
        if group is None:
            raise SlimserveError(f"INT4 CPU weights need an input width divisible by 32, not {k}")
        w = weight.float().view(n, k // group, group)
        lo, hi = w.amin(-1), w.amax(-1)
        scale = ((hi - lo) / 15).clamp(min=1e-12)
        q = ((w - lo[..., None]) / scale[..., None]).round().clamp(0, 15).to(torch.int32).view(n, k)
        self.group = group
        self.register_buffer("weight_int4", torch._convert_weight_to_int4pack_for_cpu(q, INT4_INNER_K_TILES))
        # (k / group, n, 2): scale and the value of code 8 (the kernel computes (q - 8) * scale + offset).
        self.register_buffer("scales_and_zeros", torch.stack([scale, lo + 8 * scale], -1).transpose(0, 1).to(dtype))
        self.register_buffer("bias", None if bias is None else bias.detach().to(dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        y = torch._weight_int4pack_mm_for_cpu(
            x.reshape(-1, shape[-1]), self.weight_int4, self.group, self.scales_and_zeros.contiguous()
        )
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*shape[:-1], y.shape[-1])


@torch.no_grad()
def quantize_for_cpu(model: nn.Module, mode: str) -> None:
    """Swap every engine Linear for its INT8/INT4 CPU form, and give the model an INT8 output head."""
    if mode not in MODES:
        raise SlimserveError(f"CPU weight quantization must be one of {', '.join(MODES)}, not {mode!r}")
    cls = Int8CpuLinear if mode == "int8" else Int4CpuLinear
    for module in list(model.modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, Linear):
                if child.weight.device.type != "cpu":
                    raise SlimserveError("CPU weight quantization runs on the CPU only (use --device cpu)")
                setattr(module, child_name, cls(child.weight, child.bias, child.weight.dtype))
    head = getattr(model, "lm_head", None)
    if isinstance(head, torch.Tensor):
        model.head_linear = Int8CpuLinear(head, None, head.dtype)
        if head is not getattr(model, "embed_tokens", None):
            model.lm_head = None  # the untied float head is no longer read


def cpu_threads() -> int:
    """Threads for CPU inference: the cores this process may run on, capped by a cgroup CPU quota."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    try:
        with open("/sys/fs/cgroup/cpu.max") as f:
            quota, period = f.read().split()
        if quota != "max":
            cores = min(cores, max(1, int(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return max(1, cores)
