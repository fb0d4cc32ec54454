"""The parallel state a model is built with: this process's rank, the world size and the process group.

It is passed to every layer that shards its weights (no module-level globals). A world of one is the
single-process engine: every collective below returns at once, so that path has no overhead.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from slimserve.errors import SlimserveError


@dataclass(frozen=True)
class ParallelState:
    rank: int = 0
    world_size: int = 1
    group: dist.ProcessGroup | None = None
    # MoE layers: each rank holds a range of whole experts (tokens travel to them) instead of a slice of
    # every expert.
    expert_parallel: bool = False

    @property
    def is_parallel(self) -> bool:
        return self.world_size > 1

    @property
    def is_driver(self) -> bool:
        """Rank 0 schedules, samples and returns the outputs."""
        return self.rank == 0

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum over ranks, in place."""
        if self.is_parallel:
            dist.all_reduce(x, group=self.group)
        return x

    def all_gather(self, x: torch.Tensor, dim: int = -1) -> torch.Tensor:
        """Concatenate every rank's `x` along `dim` (rank order)."""
        if not self.is_parallel:
            return x
        parts = [torch.empty_like(x) for _ in range(self.world_size)]
        dist.all_gather(parts, x.contiguous(), group=self.group)
        return torch.cat(parts, dim=dim)

    def broadcast(self, x: torch.Tensor, src: int = 0) -> torch.Tensor:
        """Every rank ends with rank `src`'s `x` (same shape and dtype on every rank)."""
        if self.is_parallel:
            dist.broadcast(x, src=self.global_rank(src), group=self.group)
        return x

    def broadcast_object(self, obj: object = None, src: int = 0) -> object:
        if not self.is_parallel:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=self.global_rank(src), group=self.group)
        return box[0]

    def min_over_ranks(self, value: int, device: torch.device) -> int:
        if not self.is_parallel:
            return value
        t = torch.tensor([value], dtype=torch.int64, device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MIN, group=self.group)
        return int(t.item())

    def global_rank(self, group_rank: int) -> int:
        return group_rank if self.group is None else dist.get_global_rank(self.group, group_rank)


def split_evenly(size: int, parallel: ParallelState, what: str) -> tuple[int, int]:
    """(start, length) of this rank's equal part of `size` items."""
    if size % parallel.world_size:
        raise SlimserveError(f"{what}={size} is not divisible by tensor_parallel_size={parallel.world_size}")
    part = size // parallel.world_size
    return parallel.rank * part, part
