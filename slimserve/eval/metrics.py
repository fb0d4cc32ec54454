"""Quality against the uncompressed model on held-out text: token-level perplexity over non-overlapping
windows (as in the GPTQ paper), KL divergence from the reference's next-token distribution, and how often
both models rank the same token first. All models see the same window in turn, so the reference's logits are
computed once per window and never stored."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn
from tqdm import tqdm

from slimserve.errors import SlimserveError


class NonFiniteLogitsError(SlimserveError):
    """A model produced NaN or infinite logits: its numbers cannot be trusted."""


@dataclass
class Quality:
    perplexity: float
    kl_divergence: float | None  # mean over tokens of KL(reference || model), in nats
    top1_agreement: float | None
    tokens: int

    def to_dict(self) -> dict:
        return asdict(self)


def windows(ids: torch.Tensor, context: int, max_windows: int | None = None) -> list[torch.Tensor]:
    """Non-overlapping windows of `context` tokens; the incomplete tail is dropped."""
    ids = ids.reshape(-1)
    n = ids.numel() // context
    if n == 0:
        raise SlimserveError(f"evaluation text has {ids.numel()} tokens, fewer than one window of {context}")
    n = n if max_windows is None else min(n, max_windows)
    return [ids[i * context : (i + 1) * context].unsqueeze(0) for i in range(n)]


def _log_probs(model: nn.Module, window: torch.Tensor, name: str, index: int) -> torch.Tensor:
    device = next(model.parameters()).device
    logits = model(input_ids=window.to(device), use_cache=False).logits[0, :-1].float()
    if not torch.isfinite(logits).all():
        raise NonFiniteLogitsError(f"{name}: non-finite logits in evaluation window {index}")
    return torch.log_softmax(logits, dim=-1)


@torch.no_grad()
def compare(
    reference: nn.Module, models: dict[str, nn.Module], wins: list[torch.Tensor], progress: bool = True
) -> dict[str, Quality]:
    """Quality of the reference (key "reference") and of every model against it."""
    names = ["reference", *models]
    nll = dict.fromkeys(names, 0.0)
    kl = dict.fromkeys(models, 0.0)
    agree = dict.fromkeys(models, 0)
    tokens = 0
    for i, w in enumerate(tqdm(wins, desc="evaluating", disable=not progress)):
        targets = w[0, 1:].unsqueeze(1)
        ref = _log_probs(reference, w, "reference", i)
        nll["reference"] += -ref.gather(1, targets.to(ref.device)).sum().item()
        ref_top = ref.argmax(-1)
        ref_p = ref.exp()
        for name, model in models.items():
            lp = _log_probs(model, w, name, i).to(ref.device)
            nll[name] += -lp.gather(1, targets.to(lp.device)).sum().item()
            kl[name] += (ref_p * (ref - lp)).sum().item()
            agree[name] += (lp.argmax(-1) == ref_top).sum().item()
        tokens += targets.shape[0]
    out = {"reference": Quality(float(torch.tensor(nll["reference"] / tokens).exp()), None, None, tokens)}
    for name in models:
        ppl = float(torch.tensor(nll[name] / tokens).exp())
        out[name] = Quality(ppl, kl[name] / tokens, agree[name] / tokens, tokens)
    return out
