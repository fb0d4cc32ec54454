"""Where a diffusers denoiser keeps its repeated blocks, and how each block's inputs map to its outputs."""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from slimserve.errors import UnsupportedArchitectureError

# Transformer block lists, in the order the model runs them (Flux runs double then single blocks).
BLOCK_LIST_NAMES = ("transformer_blocks", "single_transformer_blocks", "blocks")
# Blocks that return (encoder_hidden_states, hidden_states) instead of hidden_states alone.
PAIR_OUTPUT_BLOCKS = ("FluxTransformerBlock", "FluxSingleTransformerBlock", "JointTransformerBlock")


def denoiser_of(pipe: Any) -> nn.Module:
    """The pipeline's denoising network: its transformer, else its UNet."""
    for name in ("transformer", "unet"):
        module = getattr(pipe, name, None)
        if isinstance(module, nn.Module):
            return module
    raise UnsupportedArchitectureError(f"{type(pipe).__name__} has neither a transformer nor a unet to accelerate")


def is_unet(model: nn.Module) -> bool:
    return all(hasattr(model, name) for name in ("down_blocks", "mid_block", "up_blocks"))


def transformer_blocks(model: nn.Module) -> list[nn.Module]:
    """All repeated transformer blocks in execution order."""
    blocks: list[nn.Module] = []
    for name in BLOCK_LIST_NAMES:
        module_list = getattr(model, name, None)
        if isinstance(module_list, nn.ModuleList):
            blocks.extend(module_list)
    if not blocks:
        raise UnsupportedArchitectureError(f"{type(model).__name__} has no list of transformer blocks")
    return blocks


def repeated_blocks(model: nn.Module) -> list[nn.Module]:
    """The modules regional compilation and caching work on: transformer blocks or the UNet's stages."""
    if is_unet(model):
        return [*model.down_blocks, model.mid_block, *model.up_blocks]
    return transformer_blocks(model)


@dataclass
class BlockIO:
    """A block call's main tensors: the image tokens and (joint-attention blocks) the text tokens."""

    hidden_states: torch.Tensor
    encoder_hidden_states: torch.Tensor | None = None


def bound_arguments(forward: Any, args: tuple, kwargs: dict) -> dict[str, Any]:
    bound = inspect.signature(forward).bind(*args, **kwargs)
    return dict(bound.arguments)


def block_inputs(block: nn.Module, forward: Any, args: tuple, kwargs: dict) -> BlockIO:
    arguments = bound_arguments(forward, args, kwargs)
    encoder = arguments.get("encoder_hidden_states") if pairs_output(block) else None
    return BlockIO(arguments["hidden_states"], encoder)


def pairs_output(block: nn.Module) -> bool:
    return type(block).__name__ in PAIR_OUTPUT_BLOCKS


def block_outputs(block: nn.Module, output: Any) -> BlockIO:
    if pairs_output(block):
        encoder, hidden = output
        return BlockIO(hidden, encoder)
    return BlockIO(output)


def format_outputs(block: nn.Module, io: BlockIO) -> Any:
    """The value `block` would return for these tensors."""
    if pairs_output(block):
        return io.encoder_hidden_states, io.hidden_states
    return io.hidden_states
