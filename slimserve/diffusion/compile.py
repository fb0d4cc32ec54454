"""Regional compilation: compile each repeated block (they share one graph) instead of the whole denoiser, so
compiling takes seconds, and with dynamic shapes a new resolution does not recompile."""

from __future__ import annotations

import torch
from torch import nn

from slimserve.diffusion.blocks import repeated_blocks


def compile_blocks_(model: nn.Module, backend: str = "inductor", mode: str | None = None) -> int:
    """Compile every repeated block's forward in place; returns how many blocks were compiled."""
    blocks = repeated_blocks(model)
    for block in blocks:
        block.forward = torch.compile(block.forward, backend=backend, mode=mode, dynamic=True)
    return len(blocks)
