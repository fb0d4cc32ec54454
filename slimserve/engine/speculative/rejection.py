"""Verification of drafted tokens against the target model.

Greedy rows accept the longest prefix of drafts equal to the target's argmax, then take the target's own
next token. Sampled rows use speculative (rejection) sampling: draft d with draft probability q(d) is
accepted with probability min(1, p(d) / q(d)); at the first rejection the token is drawn from the residual
max(0, p - q), renormalized; when every draft is accepted a bonus token is drawn from p. The emitted tokens
are then distributed exactly as tokens sampled from the target one at a time. A proposer without
probabilities (prompt lookup) is a draft distribution concentrated on its token.
"""

from __future__ import annotations

import torch

from slimserve.layers.sampler import filter_logits


def sampling_probs(
    logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor, min_p: torch.Tensor
) -> torch.Tensor:
    """The distribution the sampler draws from: logits [N, V] / temperature [N], filtered by top-k, top-p and
    min-p ([N] each), softmaxed. Applied to target and draft alike, so both are over the same support."""
    scaled = logits.float() / temperature[:, None]
    if bool((top_k > 0).any() or (top_p < 1).any() or (min_p > 0).any()):
        scaled = filter_logits(scaled, top_k, top_p, min_p)
    return scaled.softmax(dim=-1)


def _num_accepted(accept: torch.Tensor, num_drafts: torch.Tensor) -> torch.Tensor:
    """Length of the leading run of accepted drafts, counting only each row's real drafts."""
    valid = torch.arange(accept.shape[1], device=accept.device)[None, :] < num_drafts[:, None]
    return (accept & valid).long().cumprod(dim=1).sum(dim=1)


def greedy_verify(
    target_argmax: torch.Tensor, draft_ids: torch.Tensor, num_drafts: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """target_argmax [B, K+1], draft_ids [B, K] (padding past num_drafts [B] is ignored) ->
    (num_accepted [B], tokens [B, K+1]); row b emits tokens[b, : num_accepted[b] + 1]."""
    num_accepted = _num_accepted(draft_ids == target_argmax[:, :-1], num_drafts)
    return num_accepted, target_argmax


def rejection_sample(
    target_probs: torch.Tensor,
    draft_ids: torch.Tensor,
    num_drafts: torch.Tensor,
    draft_probs: torch.Tensor | None,
    uniforms: torch.Tensor,
    noise: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """target_probs [B, K+1, V]: the target's distribution after the prefix and after each draft.
    draft_ids [B, K] (padding past num_drafts [B] is ignored); draft_probs [B, K, V] the distributions the
    drafts were drawn from, or None for drafts that were certain. uniforms [B, K] ~ U[0, 1) decide
    acceptance; noise [B, V] ~ Exp(1) draws the final token (argmax p / noise samples from p).
    Returns (num_accepted [B], tokens [B, K+1]); row b emits tokens[b, : num_accepted[b] + 1]."""
    batch, k = draft_ids.shape
    rows = torch.arange(batch, device=draft_ids.device)
    p_draft = target_probs[:, :k].gather(2, draft_ids[:, :, None])[:, :, 0]
    q_draft = torch.ones_like(p_draft) if draft_probs is None else draft_probs.gather(2, draft_ids[:, :, None])[:, :, 0]
    num_accepted = _num_accepted(uniforms * q_draft < p_draft, num_drafts)
    p_final = target_probs[rows, num_accepted]
    rejected = num_accepted < num_drafts
    if bool(rejected.any()):
        at = num_accepted.clamp_max(k - 1)
        if draft_probs is None:
            q_final = torch.zeros_like(p_final).scatter_(1, draft_ids[rows, at][:, None], 1.0)
        else:
            q_final = draft_probs[rows, at]
        residual = (p_final - q_final).clamp_min(0)
        # Rounding can leave no mass where p and q agree everywhere; p itself is then the residual's limit.
        residual = torch.where(residual.sum(dim=1, keepdim=True) > 0, residual, p_final)
        p_final = torch.where(rejected[:, None], residual, p_final)
    final = (p_final / noise).argmax(dim=1)
    tokens = torch.cat([draft_ids, draft_ids[:, :1]], dim=1).scatter(1, num_accepted[:, None], final[:, None])
    return num_accepted, tokens
