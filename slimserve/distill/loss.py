"""Distillation losses: forward KL from the teacher's next-token distribution (Hinton et al.), optionally
plus a cosine loss between final hidden states."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def logit_kl(student: torch.Tensor, teacher: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Mean over tokens of KL(teacher || student) at `temperature`, scaled by T^2 (gradient size kept)."""
    s = F.log_softmax(student.float() / temperature, dim=-1).flatten(0, -2)
    t = F.log_softmax(teacher.float() / temperature, dim=-1).flatten(0, -2)
    return F.kl_div(s, t, log_target=True, reduction="batchmean") * temperature**2


def hidden_cosine(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    return (1 - F.cosine_similarity(student.float(), teacher.float(), dim=-1)).mean()
