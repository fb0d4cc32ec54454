"""FP8 E4M3 weights with one scale per tensor or per output channel (compressed-tensors float-quantized,
and `quant_method: fp8` checkpoints without blocks). With FP8 activations (dynamic per token, or one static
calibrated scale) the GEMM runs on the FP8 tensor cores through torch._scaled_mm, row-wise scaled, after one
fused quantization pass over the activations; without, the weights are dequantized inside the A16 kernel."""

from __future__ import annotations

import torch

from slimserve.errors import CheckpointError
from slimserve.kernels.fp8_quant import quantize_fp8
from slimserve.kernels.fp8_quant_ref import FP8_MAX
from slimserve.kernels.quant_gemm import quant_gemm
from slimserve.kernels.quant_gemm_ref import QuantWeight, quant_gemm_ref
from slimserve.layers.quantized.base import Parts, QuantLinearBase


def random_fp8(rows: int, cols: int, generator: torch.Generator, device: torch.device) -> torch.Tensor:
    return (torch.randn(rows, cols, generator=generator, device=device) * 64).to(torch.float8_e4m3fn)


def quantize_fp8_weight(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A full-precision weight [rows, cols] rounded to FP8 E4M3 with one fp32 scale per row [rows, 1]: absmax / 448
    (1 for an all-zero row), compressed-tensors' channel strategy as `slimserve compress` computes it."""
    amax = w.float().abs().amax(dim=1, keepdim=True)
    scale = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
    return (w.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn), scale


class Fp8Linear(QuantLinearBase):
    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        act = self.scheme.act
        if act is not None and (act.type != "float" or act.group_size is not None):
            raise CheckpointError("FP8 weights with per-tensor/channel scales need FP8 per-token or static activations")

    def required(self) -> tuple[str, ...]:
        if self.scheme.online:  # full-precision weights, rounded as they load
            return ("weight",)
        return ("weight", "weight_scale") + self.input_scale_keys()

    def load_shard(self, name: str, param_name: str, tensor: torch.Tensor, shard: int = 0) -> None:
        if not (self.scheme.online and param_name == "weight"):
            return super().load_shard(name, param_name, tensor, shard)
        if tensor.dtype == torch.float8_e4m3fn or not tensor.is_floating_point():
            raise CheckpointError(f"{name}: dtype {tensor.dtype}, expected full-precision weights to quantize")
        weight, scale = quantize_fp8_weight(tensor.to(self.device))
        super().load_shard(name, "weight", weight, shard)
        self._parts[shard]["weight_scale"] = scale  # held until the layer builds, as a checkpoint's would be

    def build(self, parts: Parts) -> None:
        weights, scales = [], []
        for part, rows in zip(parts, self.shard_sizes):
            w = self.check_shape("weight", part["weight"], (rows, self.in_features))
            if w.dtype != torch.float8_e4m3fn:
                raise CheckpointError(f"FP8 weight stored as {w.dtype}, expected float8_e4m3fn")
            s = part["weight_scale"].float().reshape(-1)
            if s.numel() not in (1, rows):
                raise CheckpointError(f"weight_scale has {s.numel()} values for {rows} rows")
            weights.append(w)
            scales.append(s.expand(rows))  # a per-tensor scale becomes the same scale on every row
        self.weight = torch.cat(weights).contiguous()
        self.weight_scale = torch.cat(scales).contiguous()
        self.input_scale = self.merged_input_scale(parts)
        self.qweight = QuantWeight(self.weight, self.weight_scale[:, None], None, 8, self.in_features,
                                   self.in_features, self.out_features)  # fmt: skip
        self.scale_b = self.weight_scale[None, :]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.scheme.act is None:
            return self.add_bias(quant_gemm(x, self.qweight))
        xq, xs = quantize_fp8(x, static_scale=self.input_scale)
        if x.is_cuda:
            # Fast accumulation (partial sums promoted less often), as vLLM's Hopper FP8 kernels run.
            y = torch._scaled_mm(
                xq, self.weight.t(), scale_a=xs, scale_b=self.scale_b, out_dtype=torch.bfloat16, use_fast_accum=True
            )
            return self.add_bias(y.to(x.dtype))
        return self.add_bias(quant_gemm_ref(xq, self.qweight, xs, out_dtype=x.dtype))

    def dummy_shard(self, rows: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
        part = {
            "weight": random_fp8(rows, self.in_features, generator, self.device),
            "weight_scale": torch.rand(rows, 1, generator=generator, device=self.device) * 1e-4 + 1e-4,
        }
        return self.add_dummy_input_scale(part)
