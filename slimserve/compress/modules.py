"""The module swap: a Linear becomes a QuantizedLinear that holds exactly the tensors its checkpoint stores
(packed codes, scales, zero points, static input scale) and computes with the dequantized weight."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from slimserve.compress.args import QuantArgs
from slimserve.compress.quant import qdq
from slimserve.compress.quant.packing import pack_int32, unpack_int32


class QuantizedLinear(nn.Module):
    """A fake-quantized linear layer; its state dict is the layer's part of a compressed-tensors checkpoint.

    Formats: "pack-quantized" (int codes in int32 words: weight_packed, weight_shape), "int-quantized"
    (int8 codes in `weight`), "float-quantized" (FP8 values in `weight`)."""

    def __init__(
        self,
        q: torch.Tensor,
        scale: torch.Tensor,
        zero_point: torch.Tensor | None,
        bias: torch.Tensor | None,
        weight_args: QuantArgs,
        input_args: QuantArgs | None,
        fmt: str,
        input_scale: torch.Tensor | None = None,
    ) -> None:
        super().__init__()
        self.out_features, self.in_features = q.shape
        self.weight_args, self.input_args, self.format = weight_args, input_args, fmt
        if fmt == "pack-quantized":
            self.register_buffer("weight_packed", pack_int32(q, weight_args.num_bits))
            self.register_buffer("weight_shape", torch.tensor(q.shape, dtype=torch.int64))
        else:
            self.register_buffer("weight", q)
        self.register_buffer("weight_scale", scale)
        if zero_point is not None:
            # Zero points are packed along the output dimension, as compressed-tensors stores them.
            # Fractional zero points (HQQ) stay in the scale's dtype, unpacked.
            packed = fmt == "pack-quantized" and not zero_point.is_floating_point()
            zp = pack_int32(zero_point, weight_args.num_bits, dim=0) if packed else zero_point
            self.register_buffer("weight_zero_point", zp)
        else:
            self.weight_zero_point = None
        if input_scale is not None:
            self.register_buffer("input_scale", input_scale)
        else:
            self.input_scale = None
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)
        self.cached_weight: torch.Tensor | None = None  # set only inside `dequantized_once`

    def codes(self) -> torch.Tensor:
        """The integer codes (int8) or FP8 values, unpacked."""
        if self.format == "pack-quantized":
            return unpack_int32(self.weight_packed, self.weight_args.num_bits, self.in_features)
        return self.weight

    def zero_point(self) -> torch.Tensor | None:
        zp = self.weight_zero_point
        if zp is None or self.format != "pack-quantized" or zp.is_floating_point():
            return self.weight_zero_point
        return unpack_int32(self.weight_zero_point, self.weight_args.num_bits, self.out_features, dim=0)

    def dequantized_weight(self) -> torch.Tensor:
        return qdq.dequantize(self.codes(), self.weight_scale, self.zero_point(), self.weight_args)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_args is not None:
            x = qdq.fake_quantize_activation(x, self.input_args, self.input_scale)
        w = self.cached_weight if self.cached_weight is not None else self.dequantized_weight()
        return F.linear(x, w.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))

    def extra_repr(self) -> str:
        w = self.weight_args
        act = "" if self.input_args is None else f", act={self.input_args.type}{self.input_args.num_bits}"
        return f"{self.in_features}->{self.out_features}, w={w.type}{w.num_bits}/{w.strategy}{act}, {self.format}"


@contextmanager
def dequantized_once(module: nn.Module) -> Iterator[None]:
    """Within the block, every QuantizedLinear under `module` unpacks and dequantizes its weight once instead
    of at every call (for many forward passes: calibration, evaluation). The float copies take the memory
    the float layers took, and are dropped at the end."""
    layers = [m for m in module.modules() if isinstance(m, QuantizedLinear)]
    for m in layers:
        m.cached_weight = m.dequantized_weight()
    try:
        yield
    finally:
        for m in layers:
            m.cached_weight = None
