"""Diffusers pipelines accelerated: solvers, training-free caching, FP8/INT8 blocks, regional compilation, step
distillation and sequence/CFG parallelism."""

from slimserve.diffusion.api import Acceleration, accelerate_
from slimserve.diffusion.config import AccelerationConfig

__all__ = ["Acceleration", "AccelerationConfig", "accelerate_"]
