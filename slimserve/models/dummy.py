"""Random weights in place of a checkpoint (vLLM's `load_format="dummy"`): speed runs need only config.json.
Quantized layers draw random codes and scales in their checkpoint layout and convert them as if loaded."""

from __future__ import annotations

import torch
from torch import nn


@torch.no_grad()
def load_dummy_weights(model: nn.Module, seed: int = 0, std: float = 0.02) -> None:
    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed)
    # Quantized layers and FP8 expert banks draw their own tensors in their checkpoint layout.
    own = [m for m in model.modules() if hasattr(m, "load_dummy")]
    for module in own:
        module.load_dummy(generator)
    drawn = {id(p) for m in own for p in m.parameters()}
    for name, param in model.named_parameters():
        if id(param) in drawn:
            continue
        if name.endswith("norm.weight"):
            param.fill_(1.0)
        else:
            param.normal_(0.0, std, generator=generator)
