"""What every proposer offers the verifier, and the per-row sampling settings drafts are drawn with."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from slimserve.engine.sequence import Sequence
from slimserve.engine.speculative.rejection import sampling_probs


@dataclass
class RowSampling:
    """Sampling settings of a batch's rows as device tensors; greedy rows carry neutral values."""

    greedy: list[bool]
    temperature: torch.Tensor  # [B]
    top_k: torch.Tensor
    top_p: torch.Tensor
    min_p: torch.Tensor
    # Per row, the request's own generator (seeded requests) or None (the engine's).
    generators: list[torch.Generator | None]

    @classmethod
    def of(cls, seqs: list[Sequence], device: torch.device) -> RowSampling:
        greedy = [s.params.greedy for s in seqs]
        params = [s.params for s in seqs]
        return cls(
            greedy=greedy,
            temperature=torch.tensor([1.0 if g else p.temperature for g, p in zip(greedy, params)], device=device),
            top_k=torch.tensor([0 if g else max(p.top_k, 0) for g, p in zip(greedy, params)], device=device),
            top_p=torch.tensor([1.0 if g else p.top_p for g, p in zip(greedy, params)], device=device),
            min_p=torch.tensor([0.0 if g else p.min_p for g, p in zip(greedy, params)], device=device),
            generators=[s.generator for s in seqs],
        )

    def subset(self, rows: list[int]) -> RowSampling:
        pick = torch.tensor(rows, device=self.temperature.device)
        return RowSampling(
            [self.greedy[i] for i in rows],
            self.temperature[pick],
            self.top_k[pick],
            self.top_p[pick],
            self.min_p[pick],
            [self.generators[i] for i in rows],
        )

    def sample(self, probs: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """One token per row of probs [B, V] (exponential race); seeded rows draw from their own generator,
        so a seeded request's drafts do not depend on what it is batched with."""
        noise = torch.empty_like(probs).exponential_(generator=generator)
        for i, gen in enumerate(self.generators):
            if gen is not None and not self.greedy[i]:
                noise[i].exponential_(generator=gen)
        return (probs / noise).argmax(dim=-1)

    @property
    def all_greedy(self) -> bool:
        return all(self.greedy)

    def probs(self, logits: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
        """Sampling distribution of logits [N, V] whose row i belongs to batch row rows[i] (default: i)."""
        if rows is None:
            rows = torch.arange(logits.shape[0], device=logits.device)
        return sampling_probs(logits, self.temperature[rows], self.top_k[rows], self.top_p[rows], self.min_p[rows])


@dataclass
class Proposal:
    """Draft tokens per sequence (at most the budget asked for), and for sampled rows the distributions
    [B, K, V] they were drawn from (None when the proposer is deterministic or every row is greedy)."""

    draft_ids: list[list[int]]
    draft_probs: torch.Tensor | None = None


class Proposer:
    """Base proposer: no per-sequence state on the device, no features needed."""

    def propose(self, seqs: list[Sequence], budgets: list[int], sampling: RowSampling) -> Proposal:
        raise NotImplementedError

    def recompute_from(self, seq: Sequence) -> int:
        """First position the target must (re)compute in the next verification (features for the proposer)."""
        return seq.num_computed_tokens

    def observe(self, seqs: list[Sequence], starts: list[int], num_new: list[int], hidden: torch.Tensor | None) -> None:
        """After a step the target ran without speculation: its final hidden states [tokens, H] of
        num_new[i] tokens from position starts[i] of each sequence, packed in order (None when the step
        ran as a CUDA graph that does not expose them)."""

    def verified(
        self, seqs: list[Sequence], starts: list[int], num_emitted: list[int], hidden: torch.Tensor, cu: list[int]
    ) -> None:
        """After a verification: sequence i's target rows cu[i]:cu[i+1] cover positions from starts[i], of
        which the first (num_computed_tokens - starts[i]) are now committed. Called after num_computed_tokens
        has advanced; num_emitted[i] tokens were appended."""

    def release(self, live: set[str]) -> None:
        """Forget the state of requests that are no longer live."""
