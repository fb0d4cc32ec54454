"""compressed-tensors INT4 (or INT8) group weights with FP8 activations (W4A8): activations are quantized per
token (or with a static scale) in one pass, then the A8 Triton kernel takes one FP8 dot per group, the
integer codes (exact in E4M3) converted in registers. Symmetric weights only: the dot has no zero point."""

from __future__ import annotations

import torch

from slimserve.errors import CheckpointError
from slimserve.kernels.fp8_quant import quantize_fp8
from slimserve.kernels.quant_gemm import quant_gemm
from slimserve.layers.quantized.base import Parts
from slimserve.layers.quantized.int_weight import CompressedIntLinear


class W4A8Linear(CompressedIntLinear):
    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        act = self.scheme.act
        if not self.scheme.symmetric or act is None or act.type != "float" or act.group_size is not None:
            raise CheckpointError("integer weights with FP8 activations need symmetric weights, per-token or static")

    def required(self) -> tuple[str, ...]:
        return super().required() + self.input_scale_keys()

    def build(self, parts: Parts) -> None:
        super().build(parts)
        self.input_scale = self.merged_input_scale(parts)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.perm is not None:
            x = x[:, self.perm]
        xq, xs = quantize_fp8(x, static_scale=self.input_scale)
        return self.add_bias(quant_gemm(xq, self.qweight, xs, out_dtype=x.dtype))

    def dummy_shard(self, rows: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
        return self.add_dummy_input_scale(super().dummy_shard(rows, generator))
