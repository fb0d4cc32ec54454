"""`accelerate_(pipe, config)`: a diffusers pipeline made faster in place."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from slimserve.diffusion.blocks import denoiser_of
from slimserve.diffusion.cache_policies import policy_from_config
from slimserve.diffusion.caching import DenoiserCache
from slimserve.diffusion.compile import compile_blocks_
from slimserve.diffusion.config import AccelerationConfig
from slimserve.diffusion.quant import quantize_blocks_
from slimserve.diffusion.solvers import make_scheduler


@dataclass
class Acceleration:
    """What `accelerate_` changed; `remove_cache()` turns caching off again."""

    config: AccelerationConfig
    cache: DenoiserCache | None
    quantized_linears: int
    compiled_blocks: int

    def remove_cache(self) -> None:
        if self.cache is not None:
            self.cache.remove()
            self.cache = None


def accelerate_(pipe: Any, config: AccelerationConfig | None = None, **overrides: Any) -> Acceleration:
    """Swap the solver, quantize and compile the denoiser's blocks, and add step caching, in that order (the cache
    wraps the compiled blocks, so its data-dependent decisions stay outside the compiled graphs)."""
    config = config or AccelerationConfig(**overrides)
    model = denoiser_of(pipe)
    pipe.scheduler = make_scheduler(pipe.scheduler, config.solver)
    quantized = quantize_blocks_(model, config.quantization) if config.quantization != "none" else 0
    compiled = compile_blocks_(model) if config.compile else 0
    cache = None
    if config.cache != "none":
        start = config.cache_start_block
        if start is None:
            start = 1 if config.cache == "first_block" else 0
        cache = DenoiserCache(model, policy_from_config(config), start)
    return Acceleration(config, cache, quantized, compiled)
