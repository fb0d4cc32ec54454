"""Sharded layers of a tensor-parallel model (Megatron's layout).

Column-parallel: each rank holds a slice of the output features, so no communication follows; a fused
projection (q|k|v, gate|up) keeps its layout per rank: rank r holds q_r|k_r|v_r. Row-parallel: each rank
holds a slice of the input features and the partial products are summed over ranks. Vocabulary-parallel:
each rank holds a contiguous range of the vocabulary, for the embedding (looked up where owned, summed)
and the LM head (logits gathered).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from slimserve.distributed.state import ParallelState, split_evenly
from slimserve.errors import CheckpointError, SlimserveError
from slimserve.layers.linear import Linear


class ColumnParallelLinear(Linear):
    """Output shards of `shard_sizes` features each (the checkpoint's sizes); this rank keeps
    `shard_ranges[i]` = (start, length) of shard i, by default its equal part."""

    def __init__(
        self,
        in_features: int,
        shard_sizes: list[int],
        parallel: ParallelState,
        bias: bool = False,
        shard_ranges: list[tuple[int, int]] | None = None,
    ) -> None:
        ranges = shard_ranges or [split_evenly(size, parallel, "output features") for size in shard_sizes]
        super().__init__(in_features, [length for _, length in ranges], bias)
        self.full_shard_sizes = shard_sizes
        self.shard_ranges = ranges

    def load_shard(self, name: str, param_name: str, tensor: torch.Tensor, shard: int = 0) -> None:
        full = self.full_shard_sizes[shard]
        if tensor.dim() == 0 or tensor.shape[0] != full:
            raise CheckpointError(f"{name}: shape {tuple(tensor.shape)}, expected {full} rows")
        start, length = self.shard_ranges[shard]
        super().load_shard(name, param_name, tensor.narrow(0, start, length), shard)


class RowParallelLinear(Linear):
    """Input features split evenly over ranks; the partial outputs are summed (one all-reduce)."""

    def __init__(self, in_features: int, out_features: int, parallel: ParallelState, bias: bool = False) -> None:
        self.in_start, local_in = split_evenly(in_features, parallel, "input features")
        super().__init__(local_in, [out_features], bias)
        self.full_in_features = in_features
        self.parallel = parallel

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.parallel.is_parallel:
            return F.linear(x, self.weight, self.bias)
        y = self.parallel.all_reduce(F.linear(x, self.weight))
        return y if self.bias is None else y + self.bias

    def load_shard(self, name: str, param_name: str, tensor: torch.Tensor, shard: int = 0) -> None:
        if param_name == "weight":
            if tensor.dim() != 2 or tensor.shape[1] != self.full_in_features:
                raise CheckpointError(
                    f"{name}: shape {tuple(tensor.shape)}, expected {self.full_in_features} input features"
                )
            tensor = tensor.narrow(1, self.in_start, self.in_features)
        super().load_shard(name, param_name, tensor, shard)


@dataclass(frozen=True)
class VocabPartition:
    """This rank's rows [start, start + size) of a vocabulary padded to a multiple of the world size;
    the weight keeps `rows_per_rank` rows (padding rows stay zero)."""

    vocab_size: int
    parallel: ParallelState

    @property
    def rows_per_rank(self) -> int:
        return -(-self.vocab_size // self.parallel.world_size)

    @property
    def start(self) -> int:
        return self.parallel.rank * self.rows_per_rank

    @property
    def size(self) -> int:
        return max(0, min(self.rows_per_rank, self.vocab_size - self.start))

    def embed(self, ids: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        if not self.parallel.is_parallel:
            return F.embedding(ids, weight)
        local = ids - self.start
        owned = (local >= 0) & (local < self.size)
        x = F.embedding(torch.where(owned, local, 0), weight)
        return self.parallel.all_reduce(x * owned[:, None].to(x.dtype))

    def logits(self, hidden: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        local = F.linear(hidden, weight)
        if not self.parallel.is_parallel:
            return local
        return self.parallel.all_gather(local, dim=-1)[:, : self.vocab_size]

    def load(self, name: str, param: torch.Tensor, tensor: torch.Tensor) -> None:
        if tensor.dim() != 2 or tuple(tensor.shape) != (self.vocab_size, param.shape[1]):
            raise CheckpointError(f"{name}: shape {tuple(tensor.shape)}, expected {(self.vocab_size, param.shape[1])}")
        if not tensor.is_floating_point():
            raise CheckpointError(f"{name}: dtype {tensor.dtype}, expected a floating-point tensor")
        param.data.zero_()
        param.data[: self.size].copy_(tensor.narrow(0, self.start, self.size))


@dataclass(frozen=True)
class AttentionHeads:
    """This rank's attention heads: query heads [q_start, q_start + num_heads), KV heads
    [kv_start, kv_start + num_kv_heads). With fewer KV heads than ranks, each rank keeps a copy of the
    one KV head its query heads read."""

    num_heads: int
    num_kv_heads: int
    q_start: int
    kv_start: int

    @classmethod
    def partition(cls, num_heads: int, num_kv_heads: int, parallel: ParallelState) -> AttentionHeads:
        world, rank = parallel.world_size, parallel.rank
        q_start, local_q = split_evenly(num_heads, parallel, "num_attention_heads")
        if num_kv_heads >= world:
            kv_start, local_kv = split_evenly(num_kv_heads, parallel, "num_key_value_heads")
        elif world % num_kv_heads:
            raise SlimserveError(
                f"tensor_parallel_size={world} must divide num_key_value_heads={num_kv_heads} or be a multiple of it"
            )
        else:
            kv_start, local_kv = rank // (world // num_kv_heads), 1
        return cls(local_q, local_kv, q_start, kv_start)

    def qkv_ranges(self, head_dim: int) -> list[tuple[int, int]]:
        kv = (self.kv_start * head_dim, self.num_kv_heads * head_dim)
        return [(self.q_start * head_dim, self.num_heads * head_dim), kv, kv]
