"""Diffusers pipelines accelerated: solvers, training-free caching, FP8/INT8 blocks, regional compilation, step
distillation and sequence/CFG parallelism. Importing the package does not import diffusers (the CLI's parsers
need only the settings); `accelerate_` and `Acceleration` load it on first use."""

from typing import Any

from slimserve.diffusion.config import AccelerationConfig

__all__ = ["Acceleration", "AccelerationConfig", "accelerate_"]


def __getattr__(name: str) -> Any:
    if name in ("Acceleration", "accelerate_"):
        from slimserve.diffusion import api

        return getattr(api, name)
    raise AttributeError(name)
