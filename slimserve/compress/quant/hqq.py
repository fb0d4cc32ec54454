"""HQQ (Badri and Shaji, 2023): calibration-free asymmetric quantization. With each group's scale fixed by its
range, the zero point is found by a half-quadratic solver that minimizes the l_p (p < 1) norm of the rounding
error, so a few outlier weights do not pull every other weight off its grid point. No data, seconds per model.

The zero point stays fractional (as in HQQ), stored in the scale's dtype; dequantization is the usual
(q - zero_point) * scale."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from slimserve.compress.args import QuantArgs
from slimserve.compress.errors import QuantConfigError
from slimserve.compress.quant import qdq
from slimserve.compress.quant.rtn import QuantizedWeight


@dataclass
class HQQOptions:
    iters: int = 20
    lp_norm: float = 0.7
    beta: float = 10.0  # weight of the quadratic coupling, grown by kappa every step
    kappa: float = 1.01


def _shrink(x: torch.Tensor, beta: float, p: float) -> torch.Tensor:
    """Proximal step of the l_p norm: soft-thresholding with a magnitude-dependent threshold."""
    a = x.abs()
    return torch.sign(x) * torch.relu(a - a.clamp(min=1e-8).pow(p - 1) / beta)


@torch.no_grad()
def hqq(w: torch.Tensor, args: QuantArgs, opts: HQQOptions, dtype: torch.dtype) -> QuantizedWeight:
    if args.symmetric or args.type != "int" or args.strategy not in ("group", "channel"):
        raise QuantConfigError("HQQ optimizes zero points: it needs asymmetric integer group or channel weights")
    rows, cols = w.shape
    gs = args.group_size if args.strategy == "group" else cols
    wf = w.float().reshape(-1, gs)
    lo, hi = wf.amin(1, keepdim=True).clamp(max=0), wf.amax(1, keepdim=True).clamp(min=0)
    scale = ((hi - lo) / (args.qmax - args.qmin)).clamp(min=1e-10).to(dtype).float()
    zero = args.qmin - lo / scale
    beta = opts.beta
    best_zero, best_err = zero.clone(), torch.full_like(zero, float("inf"))
    for _ in range(opts.iters):
        q = (wf / scale + zero).round().clamp(args.qmin, args.qmax)
        wr = (q - zero) * scale
        err = (wf - wr).abs().mean(1, keepdim=True)
        better = err < best_err
        best_zero, best_err = torch.where(better, zero, best_zero), torch.where(better, err, best_err)
        we = _shrink(wf - wr, beta, opts.lp_norm)
        zero = (q - (wf - we) / scale).mean(1, keepdim=True)
        beta *= opts.kappa
    shape = (rows, cols // gs)
    scale_out = scale.reshape(shape).to(dtype)
    zp = best_zero.reshape(shape).to(dtype)
    return QuantizedWeight(qdq.quantize(w, scale_out, zp, args), scale_out, zp)
