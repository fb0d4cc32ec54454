"""FP8 E4M3 expert banks: compressed-tensors float-quantized MoE checkpoints (per-expert `weight` in FP8 with a
`weight_scale` per output channel or per tensor, and an `input_scale` when activations are static), as
`slimserve compress` and llm-compressor write them; or full-precision experts rounded to FP8 per channel as they
load (`quantization="fp8"`). The banks stay FP8 in memory; the fused MoE kernel scales each output channel in its
epilogue and quantizes the experts' inputs as the scheme says.

Under tensor parallelism each rank holds its slice of every expert's intermediate features (rows of w13 with
their scales, columns of w2); with dynamic activations it rounds its slice of the intermediate with a per-token
scale of that slice, as vLLM does."""

from __future__ import annotations

import torch

from slimserve.errors import CheckpointError
from slimserve.kernels.fused_moe_ref import Fp8ExpertScales
from slimserve.layers.moe import EXPERT_PROJECTIONS, FusedExperts
from slimserve.layers.quantized.fp8 import quantize_fp8_weight, random_fp8
from slimserve.layers.quantized.scheme import LinearScheme


def check_expert_scheme(scheme: LinearScheme) -> None:
    """One line for expert formats the fused kernel does not run."""
    act = scheme.act
    fp8_acts = act is None or (act.type == "float" and act.group_size is None)
    if scheme.type != "float" or scheme.strategy not in ("channel", "tensor") or not fp8_acts:
        what = f"{scheme.layout} {scheme.type}{scheme.bits}/{scheme.strategy}"
        what += "" if act is None else f" with {act.type}8 activations"
        raise CheckpointError(
            f"quantized MoE experts in {what} are not supported; experts run FP8 weights per channel or per tensor, "
            "weight-only or with FP8 activations per token or static"
        )


class Fp8FusedExperts(FusedExperts):
    """FusedExperts over FP8 banks with fp32 scales per (expert, output channel)."""

    def __init__(self, scheme: LinearScheme, *args, **kwargs) -> None:
        check_expert_scheme(scheme)
        super().__init__(*args, weight_dtype=torch.float8_e4m3fn, **kwargs)
        self.scheme = scheme
        self.act = None if scheme.act is None else "dynamic" if scheme.act.dynamic else "static"
        e, two_i, h = self.w13_weight.shape
        # Buffers: loading checks them through shard_keys (which quantization at load fills with the weights).
        f32 = dict(dtype=torch.float32)
        self.register_buffer("w13_weight_scale", torch.empty(e, two_i, **f32))
        self.register_buffer("w2_weight_scale", torch.empty(e, h, **f32))
        if self.act == "static":  # one scale per expert and projection; gate and up share their input
            self.register_buffer("w13_input_scale", torch.empty(e, 2, **f32))
            self.register_buffer("w2_input_scale", torch.empty(e, **f32))

    def tensor_names(self) -> tuple[str, ...]:
        if self.scheme.online:  # full-precision weights, rounded as they load
            return ("weight",)
        return ("weight", "weight_scale") + (("input_scale",) if self.act == "static" else ())

    def shard_keys(self) -> list[str]:
        keys = super().shard_keys()  # {bank}_weight#{expert}.{shard}
        extra = [k.replace("_weight#", f"_{t}#") for k in keys for t in self.tensor_names()[1:]]
        return keys + extra

    def load_expert(self, name: str, expert: int, projection: str, tensor: torch.Tensor, param: str = "weight"):
        if param == "weight" and self.scheme.online:
            if self.local_index(name, expert) is None:
                return None
            if tensor.dtype == torch.float8_e4m3fn or not tensor.is_floating_point():
                raise CheckpointError(f"{name}: dtype {tensor.dtype}, expected full-precision weights to quantize")
            # Whole rows before any tensor-parallel slicing: the scale of a row of w2 spans all its inputs.
            weight, scale = quantize_fp8_weight(tensor.to(self.w13_weight.device))
            self.load_expert(name, expert, projection, scale, "weight_scale")
            return FusedExperts.load_expert(self, name, expert, projection, weight)
        if param == "weight":
            if tensor.dtype != torch.float8_e4m3fn:
                raise CheckpointError(f"{name}: dtype {tensor.dtype}, expected float8_e4m3fn")
            return super().load_expert(name, expert, projection, tensor)
        local = self.local_index(name, expert)
        if local is None:
            return None
        bank, shard = EXPERT_PROJECTIONS[projection]
        prefix = bank.removesuffix("_weight")
        values = tensor.float().reshape(-1)
        if param == "input_scale":
            if values.numel() != 1:
                raise CheckpointError(f"{name}: {values.numel()} values, expected one static input scale")
            target = self.w13_input_scale[local, shard] if prefix == "w13" else self.w2_input_scale[local]
            target.fill_(values[0])
            return f"{prefix}_input_scale#{expert}.{shard}"
        target = getattr(self, f"{prefix}_weight_scale")[local]
        if prefix == "w13":  # this shard's rows (gate or up), and under tensor parallelism this rank's slice
            target = target.narrow(0, shard * self.intermediate_size, self.intermediate_size)
            values = values if values.numel() == 1 else self._slice(values, dim=0)
        if values.numel() == 1:  # a per-tensor scale: the same on every row
            target.fill_(values[0])
        elif values.numel() == target.numel():
            target.copy_(values)
        else:
            raise CheckpointError(f"{name}: {values.numel()} scales, expected 1 or {target.numel()}")
        return f"{prefix}_weight_scale#{expert}.{shard}"

    def load_bank(self, name: str, bank: str, tensor: torch.Tensor) -> list[str]:
        """Stacked full-precision experts (transformers' in-memory layout), rounded expert by expert."""
        if not self.scheme.online:
            raise CheckpointError(f"{name}: stacked experts in an FP8 checkpoint; expected one tensor per expert")
        if tensor.dim() != 3 or tensor.shape[0] != self.num_experts:
            raise CheckpointError(f"{name}: shape {tuple(tensor.shape)}, expected {self.num_experts} stacked experts")
        keys = []
        for e in range(self.expert_start, self.expert_start + self.num_local):
            if bank == "gate_up_proj":
                gate, up = tensor[e].chunk(2, dim=0)
                keys += [self.load_expert(name, e, "gate_proj", gate), self.load_expert(name, e, "up_proj", up)]
            else:
                keys.append(self.load_expert(name, e, "down_proj", tensor[e]))
        return keys

    def finish_loading(self) -> None:
        static = self.act == "static"
        self.scales = Fp8ExpertScales(
            self.w13_weight_scale,
            self.w2_weight_scale,
            self.act,
            # Gate and up read the same input: the larger scale clips nothing either would have clipped.
            self.w13_input_scale.amax(dim=1).contiguous() if static else None,
            self.w2_input_scale if static else None,
        )

    def load_dummy(self, generator: torch.Generator) -> None:
        """Random FP8 banks and scales (load_format="dummy" speed runs)."""
        dev = self.w13_weight.device
        for bank in (self.w13_weight, self.w2_weight):
            rows = random_fp8(bank.shape[0] * bank.shape[1], bank.shape[2], generator, dev)
            bank.data.copy_(rows.view(bank.shape))
        for scale in (self.w13_weight_scale, self.w2_weight_scale):
            scale.copy_(torch.rand(scale.shape, generator=generator, device=dev) * 1e-4 + 1e-4)
        if self.act == "static":
            self.w13_input_scale.fill_(0.05)
            self.w2_input_scale.fill_(0.05)
        self.finish_loading()

    def extra_repr(self) -> str:
        act = "weight-only" if self.act is None else f"{self.act} FP8 activations"
        last = self.expert_start + self.num_local - 1
        return f"experts {self.expert_start}..{last}, FP8/{self.scheme.strategy}, {act}"
