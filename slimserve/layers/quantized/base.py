"""What every quantized linear layer shares: the checkpoint tensors of each output shard (q|k|v, gate|up) are
collected as they load, then converted once (`finish_loading`) into the layout its kernel reads."""

from __future__ import annotations

import torch
from torch import nn

from slimserve.errors import CheckpointError
from slimserve.layers.quantized.scheme import LinearScheme

Parts = list[dict[str, torch.Tensor]]


class QuantLinearBase(nn.Module):
    """y = x W^T (+ b) for a quantized W stored as output shards stacked along dim 0."""

    def __init__(self, in_features: int, shard_sizes: list[int], bias: bool, scheme: LinearScheme) -> None:
        super().__init__()
        self.in_features = in_features
        self.shard_sizes = shard_sizes
        self.out_features = sum(shard_sizes)
        self.scheme = scheme
        # Built under the runner's default dtype and device: the model's dtype, where the weights go.
        self.dtype = torch.get_default_dtype()
        self.device = torch.empty(0).device
        self.bias = nn.Parameter(torch.empty(self.out_features), requires_grad=False) if bias else None
        self._parts: Parts | None = [{} for _ in shard_sizes]

    # ---- what the checkpoint holds per shard ------------------------------------------------------------
    def required(self) -> tuple[str, ...]:
        raise NotImplementedError

    def optional(self) -> tuple[str, ...]:
        return ()

    def build(self, parts: Parts) -> None:
        """Turn every shard's checkpoint tensors into the kernel's layout."""
        raise NotImplementedError

    def dummy_shard(self, rows: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
        """Random checkpoint tensors of one shard (for `load_format="dummy"` speed runs)."""
        raise NotImplementedError

    # ---- a static activation scale (schemes that quantize their inputs with a calibrated scale) --------------
    @property
    def static_input(self) -> bool:
        return self.scheme.act is not None and not self.scheme.act.dynamic

    def input_scale_keys(self) -> tuple[str, ...]:
        return ("input_scale",) if self.static_input else ()

    def merged_input_scale(self, parts: Parts) -> torch.Tensor | None:
        """One static input scale for a fused layer: the largest of its shards', which clips nothing any shard
        would not have clipped."""
        if not self.static_input:
            return None
        return torch.stack([p["input_scale"].float().reshape(()) for p in parts]).amax().reshape(1)

    def add_dummy_input_scale(self, part: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if self.static_input:
            part["input_scale"] = torch.full((1,), 0.05, device=self.device)
        return part

    # ---- loading -----------------------------------------------------------------------------------------
    def expected_params(self) -> list[str]:
        return list(self.required()) + (["bias"] if self.bias is not None else [])

    def shard_keys(self) -> list[str]:
        """What loading must fill: each required tensor of every output shard."""
        return [f"{param}#{i}" for param in self.expected_params() for i in range(len(self.shard_sizes))]

    def load_shard(self, name: str, param_name: str, tensor: torch.Tensor, shard: int = 0) -> None:
        if param_name == "bias":
            if self.bias is None:
                raise CheckpointError(f"{name}: unexpected tensor (this layer has no bias)")
            start = sum(self.shard_sizes[:shard])
            target = self.bias.data.narrow(0, start, self.shard_sizes[shard])
            if tuple(tensor.shape) != tuple(target.shape):
                raise CheckpointError(f"{name}: shape {tuple(tensor.shape)}, expected {tuple(target.shape)}")
            target.copy_(tensor)
            return
        if param_name not in self.required() and param_name not in self.optional():
            raise CheckpointError(f"{name}: unexpected tensor for a {self.scheme.layout} {self.scheme.type}"
                                  f"{self.scheme.bits} layer")  # fmt: skip
        if self._parts is None:
            raise CheckpointError(f"{name}: layer already built")
        self._parts[shard][param_name] = tensor.to(self.device)

    def finish_loading(self) -> None:
        parts, self._parts = self._parts, None
        if parts is not None:
            self.build(parts)

    def load_dummy(self, generator: torch.Generator) -> None:
        self._parts = None
        self.build([self.dummy_shard(rows, generator) for rows in self.shard_sizes])
        if self.bias is not None:
            self.bias.data.normal_(0, 0.02, generator=generator)

    def check_shape(self, name: str, tensor: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
        if tuple(tensor.shape) != shape:
            raise CheckpointError(f"{self.scheme.layout} {name}: shape {tuple(tensor.shape)}, expected {shape}")
        return tensor

    def add_bias(self, y: torch.Tensor) -> torch.Tensor:
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def extra_repr(self) -> str:
        s = self.scheme
        act = "" if s.act is None else f", act={s.act.type}8"
        return f"{self.in_features}->{self.out_features}, {s.layout} {s.type}{s.bits}/{s.strategy}{act}"
