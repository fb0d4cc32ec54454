"""Block-wise FP8 (DeepSeek-V3 style, compressed-tensors FP8_BLOCK and `quant_method: fp8` with
weight_block_size): FP8 weights with one scale per 128x128 block (weight_scale, or weight_scale_inv, which is
multiplied all the same), activations quantized dynamically per token and group of 128 inputs. The GEMM is
the A8 Triton kernel: one FP8 dot per 128-input group, scaled by the token's and the block's scales."""

from __future__ import annotations

import torch

from slimserve.errors import CheckpointError
from slimserve.kernels.fp8_quant import quantize_fp8
from slimserve.kernels.quant_gemm import quant_gemm
from slimserve.kernels.quant_gemm_ref import QuantWeight
from slimserve.layers.quantized.base import Parts, QuantLinearBase
from slimserve.layers.quantized.fp8 import random_fp8


class BlockFp8Linear(QuantLinearBase):
    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.block_n, self.block_k = self.scheme.block
        act = self.scheme.act
        if act is None or act.type != "float" or not act.dynamic or act.group_size not in (None, self.block_k):
            raise CheckpointError(f"block-wise FP8 needs dynamic FP8 activations in groups of {self.block_k}")
        self.scale_name = "weight_scale_inv" if self.scheme.layout == "fp8" else "weight_scale"

    def required(self) -> tuple[str, ...]:
        return ("weight", self.scale_name)

    def build(self, parts: Parts) -> None:
        k, bn, bk = self.in_features, self.block_n, self.block_k
        weights, scales = [], []
        for part, rows in zip(parts, self.shard_sizes):
            w = self.check_shape("weight", part["weight"], (rows, k))
            if w.dtype != torch.float8_e4m3fn:
                raise CheckpointError(f"FP8 weight stored as {w.dtype}, expected float8_e4m3fn")
            s = self.check_shape(self.scale_name, part[self.scale_name], (-(-rows // bn), -(-k // bk)))
            weights.append(w)
            # Shards need not be multiples of the block height: each row gets its block's scales.
            scales.append(s.float().repeat_interleave(bn, 0)[:rows])
        self.qweight = QuantWeight(torch.cat(weights).contiguous(), torch.cat(scales).contiguous(), None, 8, bk, k,
                                   self.out_features)  # fmt: skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xq, xs = quantize_fp8(x, group_size=self.block_k)
        return self.add_bias(quant_gemm(xq, self.qweight, xs, out_dtype=x.dtype))

    def dummy_shard(self, rows: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
        shape = (-(-rows // self.block_n), -(-self.in_features // self.block_k))
        return {
            "weight": random_fp8(rows, self.in_features, generator, self.device),
            self.scale_name: torch.rand(shape, generator=generator, device=self.device) * 1e-4 + 1e-4,
        }
