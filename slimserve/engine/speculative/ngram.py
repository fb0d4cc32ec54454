"""Prompt lookup (n-gram) proposer: if the last n tokens occurred earlier in the sequence, propose the tokens
that followed that earlier occurrence. No model, no device work; strong on code, quotes and summaries."""

from __future__ import annotations

from slimserve.engine.sequence import Sequence
from slimserve.engine.speculative.proposer import Proposal, Proposer, RowSampling


def prompt_lookup(tokens: list[int], num_tokens: int, min_n: int, max_n: int) -> list[int]:
    """Up to num_tokens continuation of the latest earlier match of the longest suffix n-gram (max_n down to
    min_n) of `tokens`; [] when nothing matches."""
    length = len(tokens)
    for n in range(min(max_n, length - 1), min_n - 1, -1):
        suffix = tokens[length - n :]
        first = suffix[0]
        # Scan back from the latest possible start; a match must end before the suffix itself.
        for start in range(length - n - 1, -1, -1):
            if tokens[start] == first and tokens[start : start + n] == suffix:
                return tokens[start + n : start + n + num_tokens]
    return []


class NgramProposer(Proposer):
    def __init__(self, min_n: int, max_n: int) -> None:
        self.min_n = min_n
        self.max_n = max_n

    def propose(self, seqs: list[Sequence], budgets: list[int], sampling: RowSampling) -> Proposal:
        return Proposal(
            [prompt_lookup(s.token_ids, b, self.min_n, self.max_n) if b > 0 else [] for s, b in zip(seqs, budgets)]
        )
