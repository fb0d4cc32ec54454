"""Random weights in place of a checkpoint (vLLM's `load_format="dummy"`): speed runs need only config.json.
Quantized layers draw random codes and scales in their checkpoint layout and convert them as if loaded."""

from __future__ import annotations

import torch
from torch import nn

from slimserve.layers.quantized import QuantLinearBase


@torch.no_grad()
def load_dummy_weights(model: nn.Module, seed: int = 0, std: float = 0.02) -> None:
    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed)
    for module in model.modules():
        if isinstance(module, QuantLinearBase):
            module.load_dummy(generator)
    for name, param in model.named_parameters():
        if name.endswith("norm.weight"):
            param.fill_(1.0)
        else:
            param.normal_(0.0, std, generator=generator)
