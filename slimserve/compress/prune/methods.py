"""The three pruning rules for one weight matrix W (out, in):

- magnitude: drop the smallest |W|;
- Wanda (Sun et al., 2023): drop the smallest |W_ij| * ||X_j||, the weight times its input's norm over the
  calibration tokens, compared within each output row;
- SparseGPT (Frantar & Alistarh, 2023): prune column by column and push each pruned weight's output error
  onto the columns not yet visited through the inverse Hessian of the inputs (as GPTQ does for rounding),
  choosing the mask block by block by w^2 / [H^-1]_jj^2; optionally quantizing the kept weights in the same
  pass."""

from __future__ import annotations

import torch

from slimserve.compress.args import QuantArgs
from slimserve.compress.configs import GPTQOptions
from slimserve.compress.prune.config import SparsityConfig
from slimserve.compress.prune.masks import nm_mask, prune_count, row_mask
from slimserve.compress.quant import qdq
from slimserve.compress.quant.gptq import _inverse_cholesky
from slimserve.compress.quant.rtn import QuantizedWeight


def select(score: torch.Tensor, config: SparsityConfig) -> torch.Tensor:
    """Pruning mask for a whole matrix from its scores."""
    if config.structure == "unstructured":
        return row_mask(score, prune_count(score.shape[1], config.sparsity))
    return nm_mask(score, *config.n_m)


def magnitude(w: torch.Tensor, config: SparsityConfig) -> torch.Tensor:
    mask = select(w.float().abs(), config)
    return w.masked_fill(mask, 0)


def wanda(w: torch.Tensor, input_sq_norm: torch.Tensor, config: SparsityConfig) -> torch.Tensor:
    """input_sq_norm: the sum (or mean) over calibration tokens of each input channel's square."""
    score = w.float().abs() * input_sq_norm.float().clamp(min=0).sqrt().unsqueeze(0)
    return w.masked_fill(select(score, config), 0)


def _static_scales(w: torch.Tensor, args: QuantArgs, dtype: torch.dtype) -> torch.Tensor:
    """Symmetric scales (rows, groups) from the original weight, fixed before any column changes."""
    gs = args.group_size if args.strategy == "group" else w.shape[1]
    groups = w.reshape(w.shape[0], w.shape[1] // gs, gs)
    scale, _ = qdq.qparams(groups.amin(2), groups.amax(2), args, dtype)
    return scale


def sparsegpt(
    w: torch.Tensor, h: torch.Tensor, config: SparsityConfig, quant: QuantArgs | None = None
) -> tuple[torch.Tensor, QuantizedWeight | None] | None:
    """The pruned weight (in w's dtype) and, with `quant`, its integer codes and scales; None when the
    Hessian is unusable."""
    if not torch.isfinite(h).all():
        return None
    W = w.float().clone()
    H = h.float().clone()
    rows, cols = W.shape
    dead = torch.diagonal(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    inv = _inverse_cholesky(H, GPTQOptions(damping=config.damping))
    if inv is None:
        return None
    hinv, _ = inv
    scale = _static_scales(W, quant, w.dtype) if quant is not None else None
    gs = (quant.group_size if quant.strategy == "group" else cols) if quant is not None else cols
    nm = None if config.structure == "unstructured" else config.n_m
    bs = config.block_size if nm is None else max(config.block_size // nm[1], 1) * nm[1]
    out = torch.zeros_like(W)
    for i1 in range(0, cols, bs):
        i2 = min(i1 + bs, cols)
        W1 = W[:, i1:i2].clone()
        err1 = torch.zeros_like(W1)
        hinv1 = hinv[i1:i2, i1:i2]
        diag = torch.diagonal(hinv1)
        if nm is None:
            mask1 = row_mask(W1**2 / diag.unsqueeze(0) ** 2, prune_count(cols, config.sparsity, i1, i2))
        else:
            mask1 = torch.zeros_like(W1, dtype=torch.bool)
        for i in range(i2 - i1):
            if nm is not None and i % nm[1] == 0:
                # N:M masks are chosen on the weights as updated so far, one group at a time.
                seg = W1[:, i : i + nm[1]] ** 2 / diag[i : i + nm[1]].unsqueeze(0) ** 2
                mask1[:, i : i + nm[1]] = nm_mask(seg, *nm)
            col = W1[:, i]
            q = col.masked_fill(mask1[:, i], 0)
            if quant is not None:
                s = scale[:, (i1 + i) // gs].float()
                q = (q / s).clamp(quant.qmin, quant.qmax).round() * s
            out[:, i1 + i] = q
            e = (col - q) / hinv1[i, i]
            W1[:, i:] -= e.unsqueeze(1) * hinv1[i, i:].unsqueeze(0)
            err1[:, i] = e
        W[:, i2:] -= err1 @ hinv[i1:i2, i2:]
    pruned = out.to(w.dtype)
    if quant is None:
        return pruned, None
    s = scale.float().repeat_interleave(gs, dim=1)
    codes = (out / s).round().to(torch.int8)
    return pruned, QuantizedWeight(codes, scale, None)
