"""Token sampling for a batch of requests, each with its own parameters.

Sampling draws argmax(p / E) with E ~ Exp(1) (the exponential race, equivalent to sampling from p).
A request with a seed draws its noise from its own generator, so its output does not depend on the
other requests it was batched with. Nothing here waits for the device: results stay tensors until the
runner reads them, so several decode steps can be queued back to back.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from slimserve.config import SamplingParams


@dataclass
class SampledTokens:
    token_ids: torch.Tensor  # [B]
    logprobs: torch.Tensor | None  # [B] log-probability of the chosen token under the model
    top_ids: torch.Tensor | None  # [B, k]
    top_logprobs: torch.Tensor | None  # [B, k]


@dataclass
class SamplingBatch:
    """Per-row parameters as device tensors, built once and reused for every step of a decode window."""

    params: list[SamplingParams]
    generators: list[torch.Generator | None]
    sampled_rows: torch.Tensor | None  # rows that are not greedy
    temperature: torch.Tensor | None
    filters: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None  # top_k, top_p, min_p of sampled rows
    unseeded: list[int]  # positions within sampled rows that use the engine's generator
    want_logprobs: bool
    top_k_logprobs: int


def apply_penalties(logits: torch.Tensor, params: list[SamplingParams], output_ids: list[list[int]]) -> torch.Tensor:
    """OpenAI presence/frequency penalties over each request's generated tokens."""
    for i, p in enumerate(params):
        if not (p.presence_penalty or p.frequency_penalty) or not output_ids[i]:
            continue
        ids = torch.tensor(output_ids[i], device=logits.device)
        counts = torch.zeros(logits.shape[1], device=logits.device).scatter_add_(
            0, ids, torch.ones_like(ids, dtype=torch.float32)
        )
        logits[i] -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0).float()
    return logits


def filter_logits(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """Mask (to -inf) what top-k, top-p and min-p exclude. logits [B, V] already divided by temperature;
    top_k [B] (0: off), top_p [B] (1: off), min_p [B] (0: off)."""
    vocab = logits.shape[1]
    sorted_logits, sorted_idx = logits.sort(dim=-1, descending=True)
    ranks = torch.arange(vocab, device=logits.device)[None, :]
    k = torch.where(top_k > 0, top_k, vocab)[:, None]
    remove = ranks >= k
    probs = sorted_logits.softmax(dim=-1)
    # Keep the smallest prefix whose mass reaches top_p: drop a token if the mass before it already does.
    mass_before = probs.cumsum(dim=-1) - probs
    remove |= mass_before >= top_p[:, None]
    remove |= probs < min_p[:, None] * probs[:, :1]
    remove[:, 0] = False
    sorted_logits = sorted_logits.masked_fill(remove, float("-inf"))
    return torch.empty_like(logits).scatter_(1, sorted_idx, sorted_logits)


def uses_penalties(params: SamplingParams) -> bool:
    return bool(params.presence_penalty or params.frequency_penalty)


class Sampler:
    def __init__(self, seed: int, device: torch.device) -> None:
        self.device = device
        self.generator = torch.Generator(device=device)
        self.generator.manual_seed(seed)

    def prepare(self, params: list[SamplingParams], generators: list[torch.Generator | None]) -> SamplingBatch:
        dev = self.device
        rows = [i for i, p in enumerate(params) if not p.greedy]
        sampled = [params[i] for i in rows]
        filters = None
        if any(p.top_k > 0 or p.top_p < 1 or p.min_p > 0 for p in sampled):
            filters = (
                torch.tensor([max(p.top_k, 0) for p in sampled], device=dev),
                torch.tensor([p.top_p for p in sampled], device=dev),
                torch.tensor([p.min_p for p in sampled], device=dev),
            )
        wanted = [p.logprobs for p in params if p.logprobs is not None]
        return SamplingBatch(
            params=params,
            generators=[generators[i] for i in rows],
            sampled_rows=torch.tensor(rows, device=dev) if rows else None,
            temperature=torch.tensor([p.temperature for p in sampled], device=dev)[:, None] if rows else None,
            filters=filters,
            unseeded=[j for j, i in enumerate(rows) if generators[i] is None],
            want_logprobs=bool(wanted),
            top_k_logprobs=max(wanted, default=0),
        )

    def sample(
        self, logits: torch.Tensor, batch: SamplingBatch, output_ids: list[list[int]] | None = None
    ) -> SampledTokens:
        logits = logits.float()
        if output_ids is not None and any(uses_penalties(p) for p in batch.params):
            logits = apply_penalties(logits.clone(), batch.params, output_ids)
        chosen = logits.argmax(dim=-1)
        if batch.sampled_rows is not None:
            chosen[batch.sampled_rows] = self._sample_rows(logits[batch.sampled_rows], batch)
        if not batch.want_logprobs:
            return SampledTokens(chosen, None, None, None)
        logprobs = logits.log_softmax(dim=-1)
        chosen_logprobs = logprobs.gather(1, chosen[:, None])[:, 0]
        top_ids = top_values = None
        if batch.top_k_logprobs:
            top_values, top_ids = logprobs.topk(batch.top_k_logprobs, dim=-1)
        return SampledTokens(chosen, chosen_logprobs, top_ids, top_values)

    def _sample_rows(self, logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
        logits = logits / batch.temperature
        if batch.filters is not None:
            logits = filter_logits(logits, *batch.filters)
        probs = logits.softmax(dim=-1)
        noise = torch.empty_like(probs)
        if len(batch.unseeded) == len(batch.generators):
            noise.exponential_(generator=self.generator)
        elif batch.unseeded:
            noise[batch.unseeded] = torch.empty_like(probs[batch.unseeded]).exponential_(generator=self.generator)
        for j, gen in enumerate(batch.generators):
            if gen is not None:
                noise[j].exponential_(generator=gen)
        return (probs / noise).argmax(dim=-1)
