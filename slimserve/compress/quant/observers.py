"""Weight range observers: "minmax" takes each group's own range; "mse" shrinks it by the ratio that minimizes
the group's rounding error (|w - Q(w)|^2.4 summed), which matters most at 2 and 3 bits and for ternary codes,
where clipping a few large weights buys a much finer grid for all the others. As in llm-compressor's MSE
observer, the search stops early once shrinking further has stopped helping any row."""

from __future__ import annotations

import torch

from slimserve.compress.args import QuantArgs
from slimserve.compress.quant import qdq

OBSERVERS = ("minmax", "mse")
MSE_STEPS = 50  # ratios tried, from 1 down to MSE_MIN_RATIO
MSE_MIN_RATIO = 0.2
MSE_NORM = 2.4
MSE_PATIENCE = 5  # the search stops once this many ratios in a row improved no row


def _row_error(w: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, args: QuantArgs) -> torch.Tensor:
    scale, zp = qdq.qparams(lo, hi, args, torch.float32)
    scaled = w / scale + (0 if zp is None else zp.float())
    deq = (scaled.clamp(args.qmin, args.qmax).round() - (0 if zp is None else zp.float())) * scale
    return (deq - w).abs().pow(MSE_NORM).sum(-1, keepdim=True)


def mse_row_range(w: torch.Tensor, args: QuantArgs) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows, 1) minimum and maximum of each row of w after the best shrink."""
    w = w.float()
    lo0, hi0 = w.amin(-1, keepdim=True).clamp(max=0), w.amax(-1, keepdim=True).clamp(min=0)
    best_lo, best_hi = lo0, hi0
    best = _row_error(w, lo0, hi0, args)
    stale = 0
    for step in range(1, MSE_STEPS):
        r = 1 - step * (1 - MSE_MIN_RATIO) / (MSE_STEPS - 1)
        err = _row_error(w, lo0 * r, hi0 * r, args)
        better = err < best
        stale = 0 if better.any() else stale + 1
        if stale == MSE_PATIENCE:
            break
        best = torch.where(better, err, best)
        best_lo, best_hi = torch.where(better, lo0 * r, best_lo), torch.where(better, hi0 * r, best_hi)
    return best_lo, best_hi


def row_range(w: torch.Tensor, args: QuantArgs, observer: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows, 1) range of each row of w (a row of one group, or a whole output channel)."""
    if observer == "mse":
        return mse_row_range(w, args)
    return w.amin(-1, keepdim=True), w.amax(-1, keepdim=True)


def weight_range(w: torch.Tensor, args: QuantArgs, observer: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-scale minimum and maximum of a weight in the scale layout (qdq.weight_range with an observer)."""
    if observer == "minmax" or args.strategy not in ("channel", "group"):
        return qdq.weight_range(w, args)
    rows, cols = w.shape
    gs = args.group_size if args.strategy == "group" else cols
    lo, hi = mse_row_range(w.reshape(rows * (cols // gs), gs), args)
    return lo.reshape(rows, cols // gs), hi.reshape(rows, cols // gs)
