"""Which weights to drop given a score per weight (higher = keep): per-row fractions and N:M groups."""

from __future__ import annotations

import torch


def row_mask(score: torch.Tensor, count: int) -> torch.Tensor:
    """True where a weight is pruned: the `count` lowest-scoring weights of every row."""
    mask = torch.zeros_like(score, dtype=torch.bool)
    if count > 0:
        idx = torch.topk(score, count, dim=1, largest=False).indices
        mask.scatter_(1, idx, True)
    return mask


def nm_mask(score: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """True where a weight is pruned: the n lowest-scoring of every m consecutive weights in a row."""
    rows, cols = score.shape
    if cols % m:
        raise ValueError(f"input width {cols} is not a multiple of {m}")
    groups = score.reshape(rows, cols // m, m)
    idx = torch.topk(groups, n, dim=2, largest=False).indices
    mask = torch.zeros_like(groups, dtype=torch.bool).scatter_(2, idx, True)
    return mask.reshape(rows, cols)


def prune_count(cols: int, sparsity: float, start: int = 0, stop: int | None = None) -> int:
    """How many of columns [start, stop) a row loses so that the whole row loses round(cols * sparsity)."""
    stop = cols if stop is None else stop
    return round(stop * sparsity) - round(start * sparsity)
