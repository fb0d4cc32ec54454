"""When a cached step may reuse the denoiser's blocks: every N-th step, on a small first-block change, or TeaCache's
accumulated input change."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from slimserve.diffusion.config import AccelerationConfig


def relative_l1(current: torch.Tensor, previous: torch.Tensor) -> float:
    """Mean |current - previous| over mean |previous|: the change measure FBCache and TeaCache use."""
    return ((current - previous).abs().mean() / previous.abs().mean().clamp_min(1e-12)).item()


@dataclass
class BranchState:
    """Cache state of one model call per step (a pipeline that runs cond and uncond separately has two)."""

    step: int = 0
    reuse: bool = False
    has_cache: bool = False
    previous_residual: torch.Tensor | None = None
    previous_indicator: list[torch.Tensor] = field(default_factory=list)
    accumulated: float = 0.0
    computed_steps: int = 0
    reused_steps: int = 0


class CachePolicy:
    """Decides, once per step and branch, whether the cached blocks run (False) or are reused (True)."""

    # Whether the decision needs the head's residual (first-block cache) or its inputs (TeaCache).
    needs_residual = False
    needs_indicator = False

    def reuse(self, state: BranchState, residual: torch.Tensor | None, indicator: list[torch.Tensor]) -> bool:
        raise NotImplementedError


@dataclass
class FixedInterval(CachePolicy):
    """DeepCache / FORA: compute every `interval`-th step after `warmup` computed steps, reuse in between."""

    interval: int
    warmup: int

    def reuse(self, state: BranchState, residual: torch.Tensor | None, indicator: list[torch.Tensor]) -> bool:
        if not state.has_cache or state.step < self.warmup:
            return False
        return (state.step - self.warmup) % self.interval != 0


@dataclass
class FirstBlockChange(CachePolicy):
    """First-block cache: reuse when the first blocks' residual moved less than `threshold` since it was computed."""

    threshold: float
    needs_residual = True

    def reuse(self, state: BranchState, residual: torch.Tensor | None, indicator: list[torch.Tensor]) -> bool:
        previous = state.previous_residual
        if not state.has_cache or previous is None or previous.shape != residual.shape:
            state.previous_residual = residual
            return False
        if relative_l1(residual, previous) < self.threshold:
            return True
        state.previous_residual = residual
        return False


@dataclass
class AccumulatedInputChange(CachePolicy):
    """TeaCache: sum the (polynomially rescaled) relative change of the first block's inputs (tokens and timestep
    embedding) over steps; reuse while the sum stays below `threshold`, compute and reset it otherwise."""

    threshold: float
    coefficients: tuple[float, ...]
    needs_indicator = True

    def reuse(self, state: BranchState, residual: torch.Tensor | None, indicator: list[torch.Tensor]) -> bool:
        previous, state.previous_indicator = state.previous_indicator, indicator
        shapes_match = len(previous) == len(indicator) and all(p.shape == c.shape for p, c in zip(previous, indicator))
        if not state.has_cache or not shapes_match:
            state.accumulated = 0.0
            return False
        change = sum(relative_l1(c, p) for c, p in zip(indicator, previous))
        rescaled = 0.0
        for coefficient in self.coefficients:  # Horner's rule, highest power first
            rescaled = rescaled * change + coefficient
        state.accumulated += rescaled
        if state.accumulated < self.threshold:
            return True
        state.accumulated = 0.0
        return False


def policy_from_config(config: AccelerationConfig) -> CachePolicy:
    if config.cache == "fixed":
        return FixedInterval(config.cache_interval, config.cache_warmup)
    if config.cache == "first_block":
        return FirstBlockChange(config.cache_threshold)
    return AccumulatedInputChange(config.cache_threshold, tuple(config.teacache_coefficients))
