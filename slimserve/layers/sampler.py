"""Token sampling for a batch of requests, each with its own parameters.

Sampling draws argmax(p / E) with E ~ Exp(1) (the exponential race, equivalent to sampling from p).
A request with a seed draws its noise from its own generator, so its output does not depend on the
other requests it was batched with.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from slimserve.config import SamplingParams


@dataclass
class SamplerOutput:
    token_ids: list[int]
    logprobs: list[float]  # log-probability of the chosen token under the model's distribution
    top_logprobs: list[dict[int, float] | None]


def apply_penalties(logits: torch.Tensor, params: list[SamplingParams], output_ids: list[list[int]]) -> torch.Tensor:
    """OpenAI presence/frequency penalties over each request's generated tokens."""
    rows = [i for i, p in enumerate(params) if p.presence_penalty or p.frequency_penalty]
    for i in rows:
        if not output_ids[i]:
            continue
        ids = torch.tensor(output_ids[i], device=logits.device)
        counts = torch.zeros(logits.shape[1], device=logits.device).scatter_add_(
            0, ids, torch.ones_like(ids, dtype=torch.float32)
        )
        logits[i] -= params[i].frequency_penalty * counts + params[i].presence_penalty * (counts > 0).float()
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


class Sampler:
    def __init__(self, seed: int, device: torch.device) -> None:
        self.generator = torch.Generator(device=device)
        self.generator.manual_seed(seed)

    def __call__(
        self,
        logits: torch.Tensor,
        params: list[SamplingParams],
        generators: list[torch.Generator | None],
        output_ids: list[list[int]],
    ) -> SamplerOutput:
        logits = apply_penalties(logits.float(), params, output_ids)
        model_logprobs = logits.log_softmax(dim=-1)
        chosen = logits.argmax(dim=-1)
        sampled_rows = [i for i, p in enumerate(params) if not p.greedy]
        if sampled_rows:
            chosen[sampled_rows] = self._sample(
                logits[sampled_rows], [params[i] for i in sampled_rows], [generators[i] for i in sampled_rows]
            )
        chosen_logprobs = model_logprobs.gather(1, chosen[:, None])[:, 0]
        top: list[dict[int, float] | None] = [None] * len(params)
        want_top = [i for i, p in enumerate(params) if p.logprobs]
        if want_top:
            k = max(params[i].logprobs for i in want_top)
            values, indices = model_logprobs[want_top].topk(k, dim=-1)
            for row, i in enumerate(want_top):
                n = params[i].logprobs
                top[i] = dict(zip(indices[row, :n].tolist(), values[row, :n].tolist()))
        return SamplerOutput(chosen.tolist(), chosen_logprobs.tolist(), top)

    def _sample(
        self, logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator | None]
    ) -> torch.Tensor:
        device = logits.device
        temperature = torch.tensor([p.temperature for p in params], device=device)
        logits = logits / temperature[:, None]
        if any(p.top_k > 0 or p.top_p < 1 or p.min_p > 0 for p in params):
            top_k = torch.tensor([max(p.top_k, 0) for p in params], device=device)
            top_p = torch.tensor([p.top_p for p in params], device=device)
            min_p = torch.tensor([p.min_p for p in params], device=device)
            logits = filter_logits(logits, top_k, top_p, min_p)
        probs = logits.softmax(dim=-1)
        noise = torch.empty_like(probs)
        unseeded = [i for i, gen in enumerate(generators) if gen is None]
        if unseeded:
            noise[unseeded] = torch.empty_like(probs[unseeded]).exponential_(generator=self.generator)
        for i, gen in enumerate(generators):
            if gen is not None:
                noise[i].exponential_(generator=gen)
        return (probs / noise).argmax(dim=-1)
