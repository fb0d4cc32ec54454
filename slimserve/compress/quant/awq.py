"""AWQ (Lin et al., 2023): protect the weight channels that see large activations by scaling them up before
rounding (and the activations down by the same factor, folded into the previous operation), then clip each
group's range where that lowers the output error."""

from __future__ import annotations

from collections.abc import Callable

import torch

from slimserve.compress.args import QuantArgs
from slimserve.compress.configs import AWQOptions
from slimserve.compress.quant import qdq


class InputSampler:
    """Mean |x| per input channel over all tokens, plus a uniform sample of token rows to score with."""

    def __init__(self, max_tokens: int, seed: int = 0) -> None:
        self.max_tokens = max_tokens
        self.abs_sum: torch.Tensor | None = None
        self.n = 0
        self.rows: list[torch.Tensor] = []
        self.gen = torch.Generator().manual_seed(seed)

    def add(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).float()
        s = x.abs().sum(0)
        self.abs_sum = s if self.abs_sum is None else self.abs_sum + s
        self.n += x.shape[0]
        self.rows.append(x)
        kept = sum(r.shape[0] for r in self.rows)
        if kept > 2 * self.max_tokens:
            self.rows = [self._subsample(torch.cat(self.rows), self.max_tokens)]

    def _subsample(self, x: torch.Tensor, k: int) -> torch.Tensor:
        idx = torch.randperm(x.shape[0], generator=self.gen)[:k].to(x.device)
        return x[idx]

    def mean_abs(self) -> torch.Tensor:
        return self.abs_sum / self.n

    def sample(self, k: int) -> torch.Tensor:
        x = torch.cat(self.rows)
        return x if x.shape[0] <= k else self._subsample(x, k)


def weight_mean(w: torch.Tensor, args: QuantArgs) -> torch.Tensor:
    """Mean over output rows of |w| relative to its group's absmax, per input channel: how much of its
    group's range each input channel's weights use."""
    rows, cols = w.shape
    gs = args.group_size if args.strategy == "group" else cols
    wg = w.abs().view(rows, cols // gs, gs)
    return (wg / (wg.amax(-1, keepdim=True) + 1e-6)).view(rows, cols).mean(0)


def linear_output_error(weights: list[torch.Tensor], x: torch.Tensor) -> Callable[[list[torch.Tensor]], float]:
    """The error measure of a group on its own: mean squared error of the linears' outputs on x."""
    w = torch.cat([t.float() for t in weights])
    ref = x @ w.t()
    return lambda candidate: (x @ torch.cat(candidate).t() - ref).pow(2).mean().item()


@torch.no_grad()
def search_scale(
    weights: list[torch.Tensor],
    error: Callable[[list[torch.Tensor]], float],
    x_mean_abs: torch.Tensor,
    args: QuantArgs,
    opts: AWQOptions,
) -> tuple[torch.Tensor, float, float]:
    """The per-input-channel scale s = mean|x|^alpha (alpha on a grid), divided by the weights' relative
    magnitude^(1 - alpha) with duo scaling, that minimizes `error` (of the group's linears rounded as W * s,
    then divided by s). Returns s, the best error and the error without scaling (s = 1)."""
    w = torch.cat([t.float() for t in weights])
    sizes = [t.shape[0] for t in weights]

    def rounded(s: torch.Tensor) -> list[torch.Tensor]:
        return list((qdq.fake_quantize_weight(w * s, args, torch.float32) / s).split(sizes))

    w_mean = weight_mean(w, args) if opts.duo_scaling else None
    plain_err = error(rounded(torch.ones_like(x_mean_abs)))
    best, best_err = torch.ones_like(x_mean_abs), plain_err
    for k in range(opts.grid):
        alpha = k / opts.grid
        s = x_mean_abs.pow(alpha)
        if w_mean is not None:
            s = s / (w_mean.pow(1 - alpha) + 1e-4)
        s = s.clamp(min=1e-4)
        s = s / (s.max() * s.min()).sqrt()
        err = error(rounded(s))
        if err < best_err:
            best, best_err = s, err
    return best, best_err, plain_err


@torch.no_grad()
def search_clip(w: torch.Tensor, x: torch.Tensor, args: QuantArgs, opts: AWQOptions) -> torch.Tensor:
    """w with each group clamped to +-r * max|w| (r from 1 down to max_shrink), r being the ratio that minimizes
    that group's output error on the sample x. The bound is symmetric on either grid, as AutoAWQ clips: on an
    asymmetric grid only the side of a group that reaches past r * max|w| moves, and the narrow side keeps its
    weights (shrinking both ends by r would clip weights that cost the grid no range)."""
    w = w.float()
    rows, cols = w.shape
    gs = args.group_size if args.strategy == "group" else cols
    wg = w.view(rows, cols // gs, gs)
    xg = x.float().view(x.shape[0], cols // gs, gs)
    bound = wg.abs().amax(-1, keepdim=True)
    best_ratio = torch.ones(rows, cols // gs, 1, device=w.device)
    best_err = torch.full((rows, cols // gs, 1), float("inf"), device=w.device)
    chunk = max(1, (1 << 26) // max(1, x.shape[0] * (cols // gs)))  # bounds the (tokens, rows, groups) error
    for step in range(opts.clip_grid):
        r = 1 - step * (1 - opts.max_shrink) / max(1, opts.clip_grid - 1)
        clipped = torch.maximum(torch.minimum(wg, bound * r), -bound * r).view(rows, cols)
        delta = (qdq.fake_quantize_weight(clipped, args, torch.float32) - w).view(rows, cols // gs, gs)
        err = torch.cat(
            [torch.einsum("ogk,ngk->nog", delta[i : i + chunk], xg).pow(2).mean(0) for i in range(0, rows, chunk)]
        ).unsqueeze(-1)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_ratio = torch.where(better, torch.full_like(best_ratio, r), best_ratio)
    return torch.maximum(torch.minimum(wg, bound * best_ratio), -bound * best_ratio).view(rows, cols)
