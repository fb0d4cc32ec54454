"""Acceptance counters, for the engine as a whole and for each request."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class SpeculativeStats:
    """num_drafts: verifications of a sequence that had at least one draft token; num_draft_tokens: tokens
    proposed in them; num_accepted_tokens: drafts the target accepted; num_emitted_tokens: tokens those
    verifications produced (accepted drafts plus one from the target each)."""

    num_drafts: int = 0
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0
    num_emitted_tokens: int = 0

    def add(self, num_draft_tokens: int, num_accepted: int) -> None:
        if num_draft_tokens:
            self.num_drafts += 1
            self.num_draft_tokens += num_draft_tokens
            self.num_accepted_tokens += num_accepted
            self.num_emitted_tokens += num_accepted + 1

    @property
    def acceptance_rate(self) -> float:
        return self.num_accepted_tokens / self.num_draft_tokens if self.num_draft_tokens else 0.0

    @property
    def mean_accepted_length(self) -> float:
        """Tokens per verification (1 means no draft was ever accepted)."""
        return self.num_emitted_tokens / self.num_drafts if self.num_drafts else 0.0

    def as_dict(self) -> dict[str, float]:
        return dict(
            num_drafts=self.num_drafts,
            num_draft_tokens=self.num_draft_tokens,
            num_accepted_tokens=self.num_accepted_tokens,
            acceptance_rate=self.acceptance_rate,
            mean_accepted_length=self.mean_accepted_length,
        )
