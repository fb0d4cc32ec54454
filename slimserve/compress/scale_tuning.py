"""Distil the quantization scales: once a model is rounded, its codes (and zero points) stay fixed and every
quantized layer's scales, one per group, are trained end to end to match the original model's logits (the
end-to-end step of EfficientQAT, through the distillation loop the pruned students use). A few thousand
parameters per layer move, so it is cheap and cannot overfit much; it pays at 2 bits and for ternary codes,
where one rounding decision per group costs most. The checkpoint keeps its format: only `weight_scale` changes."""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from slimserve.compress.modules import QuantizedLinear
from slimserve.compress.report import CompressionReport
from slimserve.distill.config import DistillConfig, DistillError
from slimserve.distill.loop import DistillResult, distill

SCALE_LR = 1e-4  # Adam moves each scale by about this much a step: 0.1-10% of typical group scales (1e-3 to 1e-1)


def _quantized_layers(model: nn.Module) -> list[QuantizedLinear]:
    return [m for m in model.modules() if isinstance(m, QuantizedLinear) and m.weight_scale.is_floating_point()]


@contextmanager
def trainable_scales(model: nn.Module) -> Iterator[list[nn.Parameter]]:
    """Inside: every quantized layer's `weight_scale` is a trainable parameter (same name, so the state dict
    keeps its keys) and every other parameter is frozen. After: the scales are plain buffers again."""
    layers = _quantized_layers(model)
    if not layers:
        raise DistillError("the model has no quantized layers whose scales could be trained")
    frozen = {p: p.requires_grad for p in model.parameters()}
    model.requires_grad_(False)
    dtypes = [layer.weight_scale.dtype for layer in layers]
    params = []
    for layer in layers:
        scale = nn.Parameter(layer.weight_scale.detach().float().clone())  # fp32 master copy
        del layer.weight_scale
        layer.weight_scale = scale
        params.append(scale)
    try:
        yield params
    finally:
        for layer, scale, dtype in zip(layers, params, dtypes):
            del layer.weight_scale
            layer.register_buffer("weight_scale", scale.detach().to(dtype))
        for p, flag in frozen.items():
            p.requires_grad_(flag)


def tune_scales(
    teacher: nn.Module, student: nn.Module, data: torch.Tensor, config: DistillConfig, progress: bool = True
) -> DistillResult:
    """Train the quantized `student`'s scales (in place) on `teacher`'s logits over `data` (rows of token ids)."""
    if config.weight_decay:
        raise DistillError("scale tuning needs weight_decay 0: decay would shrink every scale toward zero")
    with trainable_scales(student), tempfile.TemporaryDirectory() as scratch:
        return distill(teacher, student, data, config, scratch, resume=False, progress=progress)


def tune_after_rounding(
    teacher: nn.Module,
    student: nn.Module,
    samples: list[torch.Tensor],
    steps: int,
    report: CompressionReport,
    max_minutes: float | None = None,
    device: torch.device | None = None,
) -> None:
    """`tune_scales` on the calibration samples (rows of token ids), both models on `device`; the run is recorded
    in the report."""
    if steps <= 0:
        raise DistillError(f"scale tuning needs a positive number of steps, got {steps}")
    if not samples:
        raise DistillError("scale tuning needs calibration samples")
    data = torch.cat([s.reshape(1, -1) for s in samples])
    home = next(student.parameters()).device
    device = device or home
    config = DistillConfig(steps=steps, batch_size=min(8, data.shape[0]), lr=SCALE_LR,
                           warmup_steps=min(20, steps // 10 + 1), save_every=0,
                           max_seconds=None if max_minutes is None else 60 * max_minutes)  # fmt: skip
    result = tune_scales(teacher.to(device), student.to(device), data, config)
    student.to(home)
    report.scale_tuning = {"steps": result.steps, "seconds": result.seconds, "tokens": result.tokens,
                           "first_loss": result.losses[0], "last_loss": result.losses[-1], "lr": SCALE_LR}  # fmt: skip
