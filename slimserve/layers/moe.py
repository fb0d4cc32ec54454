"""Mixture-of-experts MLP: a softmax top-k router, a bank of SiLU-gated experts with fused gate|up and
down weights, and an optional shared expert with its sigmoid gate (Qwen2-MoE).

The expert bank holds a contiguous range of experts (all of them by default). Given a batch of tokens
and their routing, it returns the sum over the experts it holds; tokens routed elsewhere contribute
nothing. Over several ranks each rank's bank holds its equal range of the experts and the expert-parallel
dispatcher sends every (token, expert) pair to the rank holding that expert (all-to-all) and back.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from slimserve.distributed.expert_parallel import ExpertParallelDispatcher
from slimserve.distributed.state import ParallelState, split_evenly
from slimserve.errors import CheckpointError
from slimserve.kernels.fused_moe import fused_moe
from slimserve.kernels.fused_moe_ref import Fp8ExpertScales
from slimserve.layers.linear import Linear

# Hugging Face per-expert projection names (Qwen, then Mixtral's w1/w3/w2) -> (bank, shard).
EXPERT_PROJECTIONS = {
    "gate_proj": ("w13_weight", 0),
    "up_proj": ("w13_weight", 1),
    "down_proj": ("w2_weight", 0),
    "w1": ("w13_weight", 0),
    "w3": ("w13_weight", 1),
    "w2": ("w2_weight", 0),
}


def select_experts(
    router_logits: torch.Tensor, top_k: int, renormalize: bool, round_weights: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Routing as transformers does it: softmax in fp32, top-k, optionally renormalised to sum to 1,
    optionally rounded to the logits' dtype. Returns (weights [T, k], expert ids [T, k])."""
    probs = torch.softmax(router_logits, dim=-1, dtype=torch.float32)
    weights, ids = torch.topk(probs, top_k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    if round_weights:
        weights = weights.to(router_logits.dtype)
    return weights, ids


class FusedExperts(nn.Module):
    """Experts expert_start .. expert_start + num_local - 1 of num_experts, as two weight banks:
    w13 [num_local, 2I, H] (gate rows then up rows) and w2 [num_local, H, I].

    Under tensor parallelism without expert parallelism each rank holds every expert but only its slice
    `slice_index` of `num_slices` of the intermediate features (I here is the slice's width): its output
    is then a partial sum that the ranks add up."""

    def __init__(
        self,
        num_experts: int,
        hidden_size: int,
        intermediate_size: int,
        expert_start: int = 0,
        num_local: int | None = None,
        slice_index: int = 0,
        num_slices: int = 1,
        weight_dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        num_local = num_experts - expert_start if num_local is None else num_local
        if expert_start < 0 or num_local < 1 or expert_start + num_local > num_experts:
            raise ValueError(f"expert range [{expert_start}, {expert_start + num_local}) not within {num_experts}")
        self.num_experts = num_experts
        self.expert_start = expert_start
        self.num_local = num_local
        self.intermediate_size = intermediate_size
        self.slice_index, self.num_slices = slice_index, num_slices
        self.scales: Fp8ExpertScales | None = None  # FP8 banks set it once loaded
        w13 = torch.empty(num_local, 2 * intermediate_size, hidden_size, dtype=weight_dtype)
        self.w13_weight = nn.Parameter(w13, requires_grad=False)
        w2 = torch.empty(num_local, hidden_size, intermediate_size, dtype=weight_dtype)
        self.w2_weight = nn.Parameter(w2, requires_grad=False)

    def holds(self, expert: int) -> bool:
        return self.expert_start <= expert < self.expert_start + self.num_local

    def forward(self, x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor) -> torch.Tensor:
        return fused_moe(
            x, self.w13_weight, self.w2_weight, topk_weights, topk_ids, self.expert_start, self.num_experts, self.scales
        )

    def run_rows(self, hidden: torch.Tensor, local_expert_ids: torch.Tensor) -> torch.Tensor:
        """Row i through held expert local_expert_ids[i], unweighted (what the dispatcher hands a rank)."""
        ones = torch.ones(hidden.shape[0], 1, dtype=torch.float32, device=hidden.device)
        return fused_moe(hidden, self.w13_weight, self.w2_weight, ones, local_expert_ids[:, None], scales=self.scales)

    def _slice(self, tensor: torch.Tensor, dim: int) -> torch.Tensor:
        """This rank's slice of a full-width intermediate dimension (the whole tensor with one slice)."""
        if self.num_slices == 1:
            return tensor
        if tensor.shape[dim] != self.intermediate_size * self.num_slices:
            return tensor  # a wrong width: _copy_checked reports it with the expected shape
        return tensor.narrow(dim, self.slice_index * self.intermediate_size, self.intermediate_size)

    def shard_keys(self) -> list[str]:
        """What loading must fill: every held expert's gate, up and down matrix."""
        keys = []
        for e in range(self.expert_start, self.expert_start + self.num_local):
            keys += [f"w13_weight#{e}.0", f"w13_weight#{e}.1", f"w2_weight#{e}.0"]
        return keys

    def tensor_names(self) -> tuple[str, ...]:
        """What the checkpoint stores per expert projection."""
        return ("weight",)

    def local_index(self, name: str, expert: int) -> int | None:
        """Where a global expert sits in this bank (None: held elsewhere)."""
        if not 0 <= expert < self.num_experts:
            raise CheckpointError(f"{name}: expert {expert} beyond num_experts={self.num_experts}")
        return expert - self.expert_start if self.holds(expert) else None

    def load_expert(self, name: str, expert: int, projection: str, tensor: torch.Tensor, param: str = "weight"):
        """Copy one Hugging Face per-expert tensor (`param` of the projection); returns its shard key, or None
        for experts held elsewhere."""
        local = self.local_index(name, expert)
        if local is None:
            return None
        bank, shard = EXPERT_PROJECTIONS[projection]
        target = getattr(self, bank).data[local]
        if bank == "w13_weight":
            target = target.narrow(0, shard * self.intermediate_size, self.intermediate_size)
        _copy_checked(name, target, self._slice(tensor, dim=0 if bank == "w13_weight" else 1))
        return f"{bank}#{expert}.{shard}"

    def load_bank(self, name: str, bank: str, tensor: torch.Tensor) -> list[str]:
        """Copy a stacked checkpoint tensor of all experts ([E, 2I, H] gate_up_proj or [E, H, I] down_proj,
        the layout transformers keeps in memory); returns the shard keys filled."""
        param = self.w13_weight if bank == "gate_up_proj" else self.w2_weight
        if tensor.dim() != 3 or tensor.shape[0] != self.num_experts:
            raise CheckpointError(f"{name}: shape {tuple(tensor.shape)}, expected {self.num_experts} stacked experts")
        held = tensor[self.expert_start : self.expert_start + self.num_local]
        if bank == "gate_up_proj":  # gate rows then up rows, each sliced
            gate, up = held.chunk(2, dim=1)
            held = torch.cat([self._slice(gate, dim=1), self._slice(up, dim=1)], dim=1)
        else:
            held = self._slice(held, dim=2)
        _copy_checked(name, param.data, held)
        shards = (0, 1) if bank == "gate_up_proj" else (0,)
        prefix = "w13_weight" if bank == "gate_up_proj" else "w2_weight"
        held = range(self.expert_start, self.expert_start + self.num_local)
        return [f"{prefix}#{e}.{s}" for e in held for s in shards]


def _copy_checked(name: str, target: torch.Tensor, tensor: torch.Tensor) -> None:
    if not tensor.is_floating_point():
        raise CheckpointError(f"{name}: dtype {tensor.dtype}, expected a floating-point tensor")
    if tuple(tensor.shape) != tuple(target.shape):
        raise CheckpointError(f"{name}: shape {tuple(tensor.shape)}, expected {tuple(target.shape)}")
    target.copy_(tensor)


class SparseMoeBlock(nn.Module):
    """Router + experts (+ a shared expert scaled by sigmoid(shared_expert_gate(x)), when given)."""

    def __init__(
        self,
        hidden_size: int,
        num_experts: int,
        top_k: int,
        intermediate_size: int,
        renormalize: bool,
        round_weights: bool,
        shared_expert: nn.Module | None = None,
        parallel: ParallelState | None = None,
        experts_class: Callable[..., FusedExperts] = FusedExperts,
    ) -> None:
        """experts_class builds the expert bank from FusedExperts' arguments (FP8 banks: a partial of
        Fp8FusedExperts with the checkpoint's scheme)."""
        super().__init__()
        parallel = parallel or ParallelState()
        self.top_k = top_k
        self.renormalize = renormalize
        self.round_weights = round_weights
        self.gate = Linear(hidden_size, [num_experts])
        self.parallel = parallel
        # Over several ranks, expert parallelism gives each rank an equal range of whole experts and sends
        # tokens to them; tensor parallelism gives each rank a slice of every expert and adds the outputs.
        self.dispatcher = None
        if parallel.is_parallel and parallel.expert_parallel:
            self.dispatcher = ExpertParallelDispatcher(num_experts, parallel)
            start, held = split_evenly(num_experts, parallel, "num_experts")
            self.experts = experts_class(num_experts, hidden_size, intermediate_size, start, held)
        else:
            _, width = split_evenly(intermediate_size, parallel, "moe_intermediate_size")
            self.experts = experts_class(
                num_experts, hidden_size, width, slice_index=parallel.rank, num_slices=parallel.world_size
            )
        self.shared_expert = shared_expert
        self.shared_expert_gate = Linear(hidden_size, [1]) if shared_expert is not None else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights, ids = select_experts(self.gate(x), self.top_k, self.renormalize, self.round_weights)
        if self.dispatcher is None:
            out = self.parallel.all_reduce(self.experts(x, weights, ids))  # partial sums over the slices
        else:  # every rank holds the same tokens (tensor parallelism): each dispatches its share
            out = self.dispatcher.replicated(x, ids, weights, self.experts.run_rows)
        if self.shared_expert is not None:
            out = out + F.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)
        return out
