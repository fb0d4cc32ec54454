"""Training rows for distillation: the shipped generic corpus, text the teacher writes itself, or a file."""

from __future__ import annotations

import torch
from torch import nn

from slimserve.compress.cli import calibration_samples
from slimserve.compress.recipe import CalibrationSpec


def distill_data(source: str, teacher: nn.Module, tokenizer, rows: int, seq_len: int, device: torch.device,
                 seed: int = 0) -> torch.Tensor:  # fmt: skip
    """(rows, seq_len) token ids; "self" samples the teacher (on `device`) from varied prompts."""
    spec = CalibrationSpec(source=source, num_samples=rows, seq_len=seq_len, seed=seed)
    return torch.cat(calibration_samples(spec, teacher, tokenizer, device).samples, dim=0)
