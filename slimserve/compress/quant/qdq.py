"""The number grids: quantize, dequantize and fake-quantize with a given scale and zero point.

Weights are 2-D (out, in). Their scales follow compressed-tensors' layout: (1,) per tensor, (out, 1) per
channel, (out, in/g) per group, (ceil(out/bh), ceil(in/bw)) per block. Dequantization is
(q - zero_point) * scale in the scale's dtype, the formula every runtime of the format uses."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from slimserve.compress.args import QuantArgs


def _grid(scaled: torch.Tensor, args: QuantArgs) -> torch.Tensor:
    """Clamp to the grid's range and round onto it (still a float tensor for int grids)."""
    scaled = scaled.clamp(args.qmin, args.qmax)
    if args.type == "float":
        return scaled.to(torch.float8_e4m3fn)
    return scaled.round()


def _blocked(w: torch.Tensor, args: QuantArgs) -> torch.Tensor:
    """View w so that a scale of the layout's shape broadcasts after `_scale_view`."""
    if args.strategy == "group":
        return w.unflatten(-1, (w.shape[-1] // args.group_size, args.group_size))
    if args.strategy == "block":
        bh, bw = args.block_structure
        rows, cols = w.shape
        w = F.pad(w, (0, math.ceil(cols / bw) * bw - cols, 0, math.ceil(rows / bh) * bh - rows))
        return w.reshape(w.shape[0] // bh, bh, w.shape[1] // bw, bw)
    return w


def _unblocked(w: torch.Tensor, args: QuantArgs, shape: torch.Size) -> torch.Tensor:
    if args.strategy == "group":
        return w.flatten(-2)
    if args.strategy == "block":
        w = w.reshape(w.shape[0] * w.shape[1], w.shape[2] * w.shape[3])
        return w[: shape[0], : shape[1]]
    return w


def _scale_view(s: torch.Tensor, args: QuantArgs) -> torch.Tensor:
    if args.strategy == "group":
        return s.unsqueeze(-1)
    if args.strategy == "block":
        return s[:, None, :, None]
    return s


def weight_range(w: torch.Tensor, args: QuantArgs) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-scale minimum and maximum of a weight, in the scale layout."""
    b = _blocked(w.float(), args)
    if args.strategy == "tensor":
        return b.amin().reshape(1), b.amax().reshape(1)
    if args.strategy == "channel":
        return b.amin(-1, keepdim=True), b.amax(-1, keepdim=True)
    if args.strategy == "group":
        return b.amin(-1), b.amax(-1)
    return b.amin(dim=(1, 3)), b.amax(dim=(1, 3))


def qparams(
    xmin: torch.Tensor, xmax: torch.Tensor, args: QuantArgs, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Scale (in `dtype`) and int8 zero point (None when symmetric) that cover [xmin, xmax] and zero.

    Symmetric grids use absmax / qmax, so the largest magnitude is exact and never clipped."""
    xmin = xmin.float().clamp(max=0)
    xmax = xmax.float().clamp(min=0)
    if args.symmetric:
        scale = torch.maximum(-xmin, xmax) / args.qmax
    else:
        scale = (xmax - xmin) / (args.qmax - args.qmin)
    # An all-zero row gets scale 1: every value rounds to the zero point and dequantizes to exactly 0.
    scale = torch.where(scale > 0, scale, torch.ones_like(scale)).to(dtype)
    if args.symmetric:
        return scale, None
    zp = (args.qmin - xmin / scale.float()).round().clamp(args.qmin, args.qmax)
    return scale, zp.to(torch.int8)


def quantize(w: torch.Tensor, scale: torch.Tensor, zp: torch.Tensor | None, args: QuantArgs) -> torch.Tensor:
    """Integer codes (int8) or FP8 values of a weight, in the weight's shape."""
    b = _blocked(w.float(), args)
    scaled = b / _scale_view(scale.float(), args)
    if zp is not None:
        scaled = scaled + _scale_view(zp.float(), args)
    q = _unblocked(_grid(scaled, args).float(), args, w.shape)
    return q.to(torch.float8_e4m3fn if args.type == "float" else torch.int8)


def dequantize(q: torch.Tensor, scale: torch.Tensor, zp: torch.Tensor | None, args: QuantArgs) -> torch.Tensor:
    """(q - zp) * scale in the scale's dtype."""
    b = _blocked(q.to(scale.dtype), args)
    if zp is not None:
        b = b - _scale_view(zp.to(scale.dtype), args)
    return _unblocked(b * _scale_view(scale, args), args, q.shape)


def fake_quantize_weight(w: torch.Tensor, args: QuantArgs, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Round to nearest on the weight's own min/max range (the RTN baseline)."""
    scale, zp = qparams(*weight_range(w, args), args, dtype or w.dtype)
    return dequantize(quantize(w, scale, zp, args), scale, zp, args)


def dynamic_scale(x: torch.Tensor, args: QuantArgs) -> torch.Tensor:
    """Run-time scale of an activation, as compressed-tensors computes it: absmax / ((qmax - qmin) / 2)."""
    a = x.abs()
    if args.strategy == "token":
        amax = a.amax(-1, keepdim=True)
    elif args.strategy == "group":
        amax = a.unflatten(-1, (x.shape[-1] // args.group_size, args.group_size)).amax(-1)
    else:
        amax = a.amax().reshape(1)
    scale = amax / torch.tensor((args.qmax - args.qmin) / 2, dtype=x.dtype)
    return torch.where(scale == 0, torch.tensor(torch.finfo(x.dtype).eps, dtype=x.dtype), scale)


def fake_quantize_activation(x: torch.Tensor, args: QuantArgs, scale: torch.Tensor | None = None) -> torch.Tensor:
    """Quantize-dequantize an activation with its dynamic scale, or with a calibrated static one."""
    if args.dynamic:
        scale = dynamic_scale(x, args)
    grouped = args.strategy == "group"
    if grouped:
        x = x.unflatten(-1, (x.shape[-1] // args.group_size, args.group_size))
        scale = scale.unsqueeze(-1)
    q = _grid(x / scale, args).to(x.dtype)
    out = q.to(scale.dtype) * scale
    return out.flatten(-2) if grouped else out
