"""compressed-tensors INT8 weights with INT8 activations (W8A8-INT8, "int-quantized", SmoothQuant-style):
activations are rounded onto their INT8 grid (dynamic per token, or a static calibrated scale) exactly as the
checkpoint's runtime rounds them, then multiplied by the dequantized weights in the W8A16 kernel."""

from __future__ import annotations

import torch

from slimserve.errors import CheckpointError
from slimserve.layers.quantized.base import Parts
from slimserve.layers.quantized.int_weight import CompressedIntLinear


def round_int8(x: torch.Tensor, static_scale: torch.Tensor | None) -> torch.Tensor:
    """Quantize-dequantize on the INT8 grid: per-token scale absmax / 127.5 (compressed-tensors' rule)."""
    if static_scale is None:
        scale = x.abs().amax(-1, keepdim=True) / 127.5
        scale = torch.where(scale == 0, torch.finfo(x.dtype).eps, scale)
    else:
        scale = static_scale.to(x.dtype)
    return (x / scale).round().clamp(-128, 127) * scale


class Int8ActLinear(CompressedIntLinear):
    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        act = self.scheme.act
        if act is None or act.type != "int" or act.group_size is not None:
            raise CheckpointError("INT8 activations are supported per token or with a static scale")

    def required(self) -> tuple[str, ...]:
        return super().required() + self.input_scale_keys()

    def build(self, parts: Parts) -> None:
        super().build(parts)
        self.input_scale = self.merged_input_scale(parts)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(round_int8(x, self.input_scale))

    def dummy_shard(self, rows: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
        return self.add_dummy_input_scale(super().dummy_shard(rows, generator))
