"""Knobs of a distillation run."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from slimserve.errors import SlimserveError


class DistillError(SlimserveError):
    """A distillation run that cannot start: mismatched vocabularies, bad options, an unusable checkpoint."""


@dataclass
class DistillConfig:
    steps: int = 500
    batch_size: int = 8
    lr: float = 1e-4
    min_lr_ratio: float = 0.1  # cosine decay to lr * this
    warmup_steps: int = 20
    weight_decay: float = 0.0
    temperature: float = 1.0
    hidden_weight: float = 0.0  # weight of the final-hidden-state cosine loss (same hidden size only)
    grad_clip: float = 1.0
    gradient_checkpointing: bool = True
    save_every: int = 100  # steps between resumable checkpoints (0: only at the end)
    max_seconds: float | None = None  # stop (and checkpoint) once this much training time has passed
    seed: int = 0

    def __post_init__(self) -> None:
        if self.steps <= 0 or self.batch_size <= 0:
            raise DistillError("steps and batch size must be positive")
        if self.lr <= 0 or self.temperature <= 0:
            raise DistillError("learning rate and temperature must be positive")
        if self.hidden_weight < 0:
            raise DistillError("the hidden-state loss weight cannot be negative")

    def to_dict(self) -> dict:
        return asdict(self)
