"""Linear layers of the engine. Fused projections (q|k|v, gate|up) keep one weight matrix so that a
decode step reads it in one GEMM; `load_shard` places each Hugging Face tensor at its offset."""

import torch
import torch.nn.functional as F
from torch import nn

from slimserve.errors import CheckpointError


class Linear(nn.Module):
    """y = x W^T (+ b) with the weight stored as output shards stacked along dim 0."""

    def __init__(self, in_features: int, shard_sizes: list[int], bias: bool = False) -> None:
        super().__init__()
        self.in_features = in_features
        self.shard_sizes = shard_sizes
        out_features = sum(shard_sizes)
        self.weight = nn.Parameter(torch.empty(out_features, in_features), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(out_features), requires_grad=False) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)

    def shard_keys(self) -> list[str]:
        """What loading must fill: every output shard of the weight (and bias)."""
        return [f"{param}#{i}" for param, _ in self.named_parameters() for i in range(len(self.shard_sizes))]

    def load_shard(self, name: str, param_name: str, tensor: torch.Tensor, shard: int = 0) -> None:
        """Copy one checkpoint tensor into output shard `shard` of the weight or bias."""
        param = self.weight if param_name == "weight" else self.bias
        if param is None:
            raise CheckpointError(f"{name}: unexpected tensor (this layer has no {param_name})")
        start = sum(self.shard_sizes[:shard])
        target = param.data.narrow(0, start, self.shard_sizes[shard])
        if not tensor.is_floating_point():
            raise CheckpointError(f"{name}: dtype {tensor.dtype}, expected a floating-point tensor")
        if tuple(tensor.shape) != tuple(target.shape):
            raise CheckpointError(f"{name}: shape {tuple(tensor.shape)}, expected {tuple(target.shape)}")
        target.copy_(tensor)
