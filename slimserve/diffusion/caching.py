"""Training-free caching as forward wrappers on a diffusers denoiser.

Transformers (DiT, PixArt, SD3, Flux, HunyuanDiT): the blocks from `start` to the last one form the cached body. A
computed step stores the body's residual (output minus input, per token stream); a reused step adds the stored
residual to the body's current input and runs none of the body's blocks. UNets (DeepCache): the first down block
and the last up block always run; the deeper stages return their outputs of the last computed step.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from torch import nn

from slimserve.diffusion import blocks as blk
from slimserve.diffusion.cache_policies import BranchState, CachePolicy
from slimserve.errors import UnsupportedArchitectureError

TIMESTEP_EMBEDDING_ARGS = ("temb", "timestep", "emb")


class StepTracker:
    """Turns the denoiser's calls into (step, branch): diffusers timesteps fall within one generation, so a larger
    timestep starts a new generation and an equal one is another branch (a separate cond/uncond call) of a step."""

    def __init__(self) -> None:
        self.branches: list[BranchState] = []
        self.branch = 0
        self._last_timestep: float | None = None
        self._step = 0

    def begin_call(self, timestep: Any) -> BranchState:
        value = float(timestep.flatten()[0]) if isinstance(timestep, torch.Tensor) else float(timestep)
        if self._last_timestep is None or value > self._last_timestep:
            self.branches, self._step, self.branch = [], 0, 0
        elif value == self._last_timestep:
            self.branch += 1
        else:
            self._step, self.branch = self._step + 1, 0
        self._last_timestep = value
        while len(self.branches) <= self.branch:
            self.branches.append(BranchState())
        state = self.branches[self.branch]
        state.step = self._step
        return state

    def reset(self) -> None:
        self.__init__()


class _Wrapped:
    """Replaces `module.forward` by a wrapper for the cache's lifetime."""

    def __init__(self) -> None:
        self._originals: list[tuple[nn.Module, Any]] = []

    def wrap(self, module: nn.Module, make: Any) -> None:
        original = module.forward
        # A forward set on the instance (a compiled one) comes back on removal; the class's forward needs none.
        self._originals.append((module, module.__dict__.get("forward")))
        module.forward = functools.wraps(original)(make(original))

    def remove(self) -> None:
        for module, original in reversed(self._originals):
            if original is None:
                del module.forward
            else:
                module.forward = original
        self._originals.clear()


class DenoiserCache:
    """Caching on one denoiser; `remove()` restores the original forwards."""

    def __init__(self, model: nn.Module, policy: CachePolicy, start_block: int) -> None:
        self.model = model
        self.policy = policy
        self.tracker = StepTracker()
        self.state = BranchState()
        self._wrapped = _Wrapped()
        self._wrapped.wrap(model, self._top_level)
        if blk.is_unet(model):
            self._wrap_unet(model)
        else:
            self._wrap_transformer(blk.transformer_blocks(model), start_block)

    # -- statistics ------------------------------------------------------------------------------------------------
    @property
    def computed_steps(self) -> int:
        return sum(b.computed_steps for b in self.tracker.branches)

    @property
    def reused_steps(self) -> int:
        return sum(b.reused_steps for b in self.tracker.branches)

    def remove(self) -> None:
        self._wrapped.remove()

    def _top_level(self, original: Any) -> Any:
        def forward(*args: Any, **kwargs: Any) -> Any:
            arguments = blk.bound_arguments(original, args, kwargs)
            self.state = self.tracker.begin_call(arguments["timestep"])
            return original(*args, **kwargs)

        return forward

    def _decide(self, residual: torch.Tensor | None, indicator: list[torch.Tensor]) -> None:
        state = self.state
        state.reuse = self.policy.reuse(state, residual, indicator)
        if state.reuse:
            state.reused_steps += 1
        else:
            state.computed_steps += 1

    # -- transformers ----------------------------------------------------------------------------------------------
    def _wrap_transformer(self, blocks: list[nn.Module], start: int) -> None:
        if not 0 <= start < len(blocks):
            raise UnsupportedArchitectureError(f"cache start block {start} is outside the model's {len(blocks)} blocks")
        if start == 0 and self.policy.needs_residual:
            raise UnsupportedArchitectureError("the first-block cache needs at least one uncached block (start >= 1)")
        last = len(blocks) - 1
        stored: dict[str, Any] = {}

        def make(index: int, block: nn.Module) -> Any:
            def wrapper(original: Any) -> Any:
                def forward(*args: Any, **kwargs: Any) -> Any:
                    inputs = blk.block_inputs(block, original, args, kwargs)
                    if index == 0:
                        stored["head_input"] = inputs.hidden_states
                        if self.policy.needs_indicator:
                            stored["indicator"] = _indicator(inputs, original, args, kwargs)
                    if index < start:
                        return original(*args, **kwargs)
                    state = self.state
                    if index == start:
                        residual = inputs.hidden_states - stored["head_input"] if self.policy.needs_residual else None
                        self._decide(residual, stored.get("indicator", []))
                        stored["body_input"] = inputs
                        if state.reuse:
                            return blk.format_outputs(block, _add(inputs, stored["delta"]))
                    elif state.reuse:
                        return blk.format_outputs(block, inputs)
                    output = original(*args, **kwargs)
                    if index == last:
                        stored["delta"] = _subtract(blk.block_outputs(block, output), stored["body_input"])
                        state.has_cache = True
                    return output

                return forward

            return wrapper

        for index, block in enumerate(blocks):
            self._wrapped.wrap(block, make(index, block))

    # -- UNets (DeepCache) -----------------------------------------------------------------------------------------
    def _wrap_unet(self, model: nn.Module) -> None:
        if len(model.down_blocks) < 2 or len(model.up_blocks) < 2:
            raise UnsupportedArchitectureError("UNet caching needs at least two down and two up blocks")
        head = model.down_blocks[0]
        body = [*model.down_blocks[1:], model.mid_block, *model.up_blocks[:-1]]
        stored: dict[str, Any] = {}
        outputs: dict[int, Any] = {}

        def head_wrapper(original: Any) -> Any:
            def forward(*args: Any, **kwargs: Any) -> Any:
                arguments = blk.bound_arguments(original, args, kwargs)
                if self.policy.needs_indicator:
                    stored["indicator"] = [
                        arguments[name] for name in ("hidden_states", "temb") if arguments.get(name) is not None
                    ]
                output = original(*args, **kwargs)
                stored["head_output"] = output[0]
                return output

            return forward

        def body_wrapper(index: int) -> Any:
            def wrapper(original: Any) -> Any:
                def forward(*args: Any, **kwargs: Any) -> Any:
                    state = self.state
                    if index == 0:
                        residual = stored["head_output"] if self.policy.needs_residual else None
                        self._decide(residual, stored.get("indicator", []))
                    if state.reuse:
                        return outputs[index]
                    outputs[index] = original(*args, **kwargs)
                    if index == len(body) - 1:
                        state.has_cache = True
                    return outputs[index]

                return forward

            return wrapper

        self._wrapped.wrap(head, head_wrapper)
        for index, module in enumerate(body):
            self._wrapped.wrap(module, body_wrapper(index))


def _indicator(inputs: blk.BlockIO, original: Any, args: tuple, kwargs: dict) -> list[torch.Tensor]:
    """TeaCache's inputs: the image tokens entering the first block and its timestep embedding."""
    arguments = blk.bound_arguments(original, args, kwargs)
    indicator = [inputs.hidden_states]
    for name in TIMESTEP_EMBEDDING_ARGS:
        value = arguments.get(name)
        if isinstance(value, torch.Tensor) and value.is_floating_point():
            indicator.append(value)
            break
    return indicator


def _subtract(output: blk.BlockIO, inputs: blk.BlockIO) -> blk.BlockIO:
    encoder = None
    if output.encoder_hidden_states is not None and inputs.encoder_hidden_states is not None:
        encoder = output.encoder_hidden_states - inputs.encoder_hidden_states
    return blk.BlockIO(output.hidden_states - inputs.hidden_states, encoder)


def _add(inputs: blk.BlockIO, delta: blk.BlockIO) -> blk.BlockIO:
    encoder = inputs.encoder_hidden_states
    if encoder is not None and delta.encoder_hidden_states is not None:
        encoder = encoder + delta.encoder_hidden_states
    return blk.BlockIO(inputs.hidden_states + delta.hidden_states, encoder)
