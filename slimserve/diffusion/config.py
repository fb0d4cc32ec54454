"""What `accelerate_` does to a diffusers pipeline, as one dataclass (the CLI's flags map onto it)."""

from __future__ import annotations

from dataclasses import dataclass

from slimserve.errors import SlimserveError

SOLVERS = ("auto", "keep", "euler", "dpm++", "unipc", "ddim")
CACHES = ("none", "fixed", "first_block", "teacache")
QUANTIZATIONS = ("none", "fp8", "int8")


class DiffusionConfigError(SlimserveError):
    """An impossible acceleration setting (unknown solver or cache, interval < 1, negative threshold)."""


@dataclass
class AccelerationConfig:
    solver: str = "auto"
    # Caching of the denoiser's repeated blocks across sampling steps.
    cache: str = "none"
    cache_interval: int = 2  # fixed: recompute every N-th step
    cache_warmup: int = 1  # fixed: steps always computed at the start
    cache_threshold: float = 0.1  # first_block / teacache: reuse while the change stays below this
    cache_start_block: int | None = None  # first cached block (default: 1 for first_block, else 0)
    teacache_coefficients: tuple[float, ...] = (1.0, 0.0)  # polynomial rescaling of the indicator, highest power first
    quantization: str = "none"
    compile: bool = False

    def __post_init__(self) -> None:
        if self.solver not in SOLVERS:
            raise DiffusionConfigError(f"unknown solver {self.solver!r}; choose one of {', '.join(SOLVERS)}")
        if self.cache not in CACHES:
            raise DiffusionConfigError(f"unknown cache {self.cache!r}; choose one of {', '.join(CACHES)}")
        if self.quantization not in QUANTIZATIONS:
            raise DiffusionConfigError(
                f"unknown quantization {self.quantization!r}; choose one of {', '.join(QUANTIZATIONS)}"
            )
        if self.cache_interval < 1:
            raise DiffusionConfigError(f"cache_interval must be >= 1, got {self.cache_interval}")
        if self.cache_warmup < 0:
            raise DiffusionConfigError(f"cache_warmup must be >= 0, got {self.cache_warmup}")
        if self.cache_threshold < 0:
            raise DiffusionConfigError(f"cache_threshold must be >= 0, got {self.cache_threshold}")


class DistillationError(SlimserveError):
    """A teacher that cannot be distilled or a setting that makes no sense."""


@dataclass
class DistillConfig:
    student_steps: int = 4
    substeps: int = 8  # teacher Euler steps inside each student step
    guidance_scale: float = 3.0
    num_trajectories: int = 512
    train_steps: int = 600
    batch_size: int = 64
    lr: float = 2e-4
    checkpoint_every: int = 100
    seed: int = 0
    height: int | None = None  # text pipelines: image size (default: the pipeline's)
    width: int | None = None
    max_sequence_length: int = 512  # Flux: T5 tokens per caption

    def __post_init__(self) -> None:
        for name in ("student_steps", "substeps", "num_trajectories", "train_steps", "batch_size", "checkpoint_every"):
            if getattr(self, name) < 1:
                raise DistillationError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.lr <= 0:
            raise DistillationError(f"lr must be > 0, got {self.lr}")
