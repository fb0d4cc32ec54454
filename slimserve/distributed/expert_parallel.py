"""Expert parallelism: each rank owns a contiguous range of a MoE layer's experts; a token routed to an
expert on another rank travels there and its result comes back (two all-to-alls each way: the counts,
then the payload).

    dispatcher = ExpertParallelDispatcher(num_experts, parallel)
    out = dispatcher(x, topk_ids, topk_weights, run_local_experts)

`run_local_experts(hidden [R, H], local_expert_ids [R]) -> [R, H]` applies expert
`dispatcher.expert_start + local_expert_ids[i]` to row i (a MoE layer's grouped GEMM over the experts it
holds); the rows arrive sorted by local expert. In a single process it is the plain MoE computation.

Under tensor parallelism every rank holds the same tokens (attention ends in an all-reduce): there
`dispatcher.replicated(...)` has each rank dispatch only its share of the tokens and all-gathers the
results, so every expert computes each token once.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist

from slimserve.distributed.state import ParallelState, split_evenly


@dataclass
class Dispatched:
    """Rows this rank received, and what `combine` needs to send their results back."""

    hidden: torch.Tensor  # [R, H] token states for this rank's experts, sorted by local expert
    local_expert_ids: torch.Tensor  # [R]
    order: torch.Tensor  # [T * K] assignment index of each row this rank sent, in send order
    send_counts: list[int]  # rows sent to each rank
    recv_counts: list[int]  # rows received from each rank
    recv_order: torch.Tensor  # [R] position in the received buffer of each row of `hidden`


class ExpertParallelDispatcher:
    def __init__(self, num_experts: int, parallel: ParallelState) -> None:
        self.parallel = parallel
        self.num_experts = num_experts
        self.expert_start, self.num_local_experts = split_evenly(num_experts, parallel, "num_experts")

    def __call__(
        self,
        x: torch.Tensor,
        topk_ids: torch.Tensor,
        topk_weights: torch.Tensor,
        run_local_experts: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    ) -> torch.Tensor:
        """sum_k topk_weights[t, k] * expert[topk_ids[t, k]](x[t]) for every token t of this rank."""
        sent = self.dispatch(x, topk_ids)
        return self.combine(run_local_experts(sent.hidden, sent.local_expert_ids), sent, topk_weights)

    def replicated(
        self,
        x: torch.Tensor,
        topk_ids: torch.Tensor,
        topk_weights: torch.Tensor,
        run_local_experts: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    ) -> torch.Tensor:
        """The same result for tokens that every rank holds: rank r dispatches rows [r * n, (r + 1) * n)
        (n = ceil(T / world)), and the shares are gathered back."""
        if not self.parallel.is_parallel:
            return self(x, topk_ids, topk_weights, run_local_experts)
        num_tokens = x.shape[0]
        share = -(-num_tokens // self.parallel.world_size)
        rows = slice(min(self.parallel.rank * share, num_tokens), min((self.parallel.rank + 1) * share, num_tokens))
        out = self(x[rows], topk_ids[rows], topk_weights[rows], run_local_experts)
        padded = out.new_zeros((share, out.shape[1]))
        padded[: out.shape[0]] = out
        return self.parallel.all_gather(padded, dim=0)[:num_tokens]

    def _all_to_all(self, t: torch.Tensor, send_counts: list[int], recv_counts: list[int]) -> torch.Tensor:
        out = t.new_empty((sum(recv_counts), *t.shape[1:]))
        dist.all_to_all_single(out, t.contiguous(), recv_counts, send_counts, group=self.parallel.group)
        return out

    def dispatch(self, x: torch.Tensor, topk_ids: torch.Tensor) -> Dispatched:
        world = self.parallel.world_size
        top_k = topk_ids.shape[1]
        flat_ids = topk_ids.reshape(-1)
        # Sorting assignments by expert also groups them by owning rank (experts are contiguous per rank).
        order = flat_ids.argsort(stable=True)
        sorted_ids = flat_ids[order]
        rows = x[order // top_k]
        owner = sorted_ids // self.num_local_experts
        send_counts = torch.bincount(owner, minlength=world)
        if world == 1:
            counts = send_counts.tolist()
            return Dispatched(rows, sorted_ids, order, counts, counts, torch.arange(len(order), device=x.device))
        recv_counts_t = torch.empty_like(send_counts)
        dist.all_to_all_single(recv_counts_t, send_counts, group=self.parallel.group)
        send, recv = send_counts.tolist(), recv_counts_t.tolist()
        hidden = self._all_to_all(rows, send, recv)
        local_ids = self._all_to_all(sorted_ids - owner * self.num_local_experts, send, recv)
        # Rows from each source rank are sorted by expert; merge them so the experts see contiguous runs.
        recv_order = local_ids.argsort(stable=True)
        return Dispatched(hidden[recv_order], local_ids[recv_order], order, send, recv, recv_order)

    def combine(self, expert_out: torch.Tensor, sent: Dispatched, topk_weights: torch.Tensor) -> torch.Tensor:
        num_tokens, top_k = topk_weights.shape
        received = torch.empty_like(expert_out)
        received[sent.recv_order] = expert_out
        if self.parallel.is_parallel:
            received = self._all_to_all(received, sent.recv_counts, sent.send_counts)
        per_assignment = torch.empty_like(received)
        per_assignment[sent.order] = received
        per_token = per_assignment.view(num_tokens, top_k, received.shape[-1])
        return (per_token * topk_weights[:, :, None].to(received.dtype)).sum(dim=1)
