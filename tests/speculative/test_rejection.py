"""Speculative sampling keeps the target's distribution: chi-square tests of the rejection sampler on a small
vocabulary with many samples (each batch row is one independent trial)."""

import torch

from slimserve.engine.speculative.proposer import RowSampling
from slimserve.engine.speculative.rejection import greedy_verify, rejection_sample, sampling_probs

VOCAB, K, N = 6, 3, 40_000


def chi_square_p_value(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """P-value of observed counts under probs (cells with zero probability must be empty)."""
    keep = probs > 0
    assert counts[~keep].sum() == 0
    expected = probs[keep] * counts.sum()
    stat = ((counts[keep] - expected) ** 2 / expected).sum()
    dof = torch.tensor(float(keep.sum() - 1))
    return torch.special.gammaincc(dof / 2, stat / 2).item()


def random_dists(gen: torch.Generator, rows: int, sharp: float = 1.5) -> torch.Tensor:
    return (torch.randn(rows, VOCAB, generator=gen, dtype=torch.float64) * sharp).softmax(-1)


def speculate(p: torch.Tensor, q: torch.Tensor | None, gen: torch.Generator, num_drafts: int = K):
    """N trials with the same target distributions p [K+1, V] and draft distributions q [K, V] (None: the
    drafts are fixed tokens 0, 1, 2)."""
    if q is None:
        drafts = torch.arange(K).repeat(N, 1)
    else:
        drafts = torch.multinomial(q, N, replacement=True, generator=gen).T  # [N, K], column j from q[j]
    uniforms = torch.rand(N, K, generator=gen, dtype=torch.float64)
    noise = torch.empty(N, VOCAB, dtype=torch.float64).exponential_(generator=gen)
    return rejection_sample(
        p.expand(N, K + 1, VOCAB),
        drafts,
        torch.full((N,), num_drafts),
        None if q is None else q.expand(N, K, VOCAB),
        uniforms,
        noise,
    )


def test_first_token_follows_the_target():
    gen = torch.Generator().manual_seed(0)
    p, q = random_dists(gen, K + 1), random_dists(gen, K)
    for draft in (q, None):
        accepted, tokens = speculate(p, draft, gen)
        counts = torch.bincount(tokens[:, 0], minlength=VOCAB).double()
        assert chi_square_p_value(counts, p[0]) > 1e-3
        assert 0 < accepted.float().mean() < K  # both acceptance and rejection happened


def test_two_tokens_follow_the_target_jointly():
    """Complete a two-token generation the way the engine would (a later step samples token 1 from the
    target when only one token was emitted): the pair must be distributed as p0 x p1."""
    gen = torch.Generator().manual_seed(1)
    p, q = random_dists(gen, K + 1), random_dists(gen, K)
    for draft in (q, None):
        accepted, tokens = speculate(p, draft, gen)
        second = torch.where(accepted >= 1, tokens[:, 1], torch.multinomial(p[1], N, replacement=True, generator=gen))
        counts = torch.bincount(tokens[:, 0] * VOCAB + second, minlength=VOCAB * VOCAB).double()
        assert chi_square_p_value(counts, torch.outer(p[0], p[1]).flatten()) > 1e-3


def test_bonus_token_after_all_accepted_and_no_drafts():
    gen = torch.Generator().manual_seed(2)
    p = random_dists(gen, K + 1)
    # The draft equals the target: every draft is accepted and the bonus token comes from p[K].
    q = p[:K].clone()
    accepted, tokens = speculate(p, q, gen)
    assert bool((accepted == K).all())
    assert chi_square_p_value(torch.bincount(tokens[:, K], minlength=VOCAB).double(), p[K]) > 1e-3
    # No drafts at all: one token from p[0].
    accepted, tokens = speculate(p, q, gen, num_drafts=0)
    assert bool((accepted == 0).all())
    assert chi_square_p_value(torch.bincount(tokens[:, 0], minlength=VOCAB).double(), p[0]) > 1e-3


def test_filtered_distributions_keep_the_filtered_target():
    """With top-k / top-p applied to target and draft logits alike, the output follows the filtered target."""
    gen = torch.Generator().manual_seed(3)
    target_logits = torch.randn(K + 1, VOCAB, generator=gen) * 2
    draft_logits = target_logits + torch.randn(K + 1, VOCAB, generator=gen)
    settings = dict(temperature=torch.full((K + 1,), 0.8), top_k=torch.full((K + 1,), 4), min_p=torch.zeros(K + 1))
    p = sampling_probs(target_logits, top_p=torch.full((K + 1,), 0.9), **settings).double()
    q = sampling_probs(draft_logits, top_p=torch.full((K + 1,), 0.9), **settings).double()[:K]
    assert bool(((p > 0).sum(-1) <= 4).all())
    accepted, tokens = speculate(p, q, gen)
    assert chi_square_p_value(torch.bincount(tokens[:, 0], minlength=VOCAB).double(), p[0]) > 1e-3


def test_greedy_verify_accepts_the_matching_prefix():
    argmax = torch.tensor([[4, 5, 6, 7], [4, 5, 6, 7], [1, 2, 3, 0]])
    drafts = torch.tensor([[4, 5, 9], [4, 5, 6], [1, 2, 3]])
    accepted, tokens = greedy_verify(argmax, drafts, torch.tensor([3, 3, 1]))
    assert accepted.tolist() == [2, 3, 1]
    assert [t[: n + 1] for t, n in zip(tokens.tolist(), accepted.tolist())] == [[4, 5, 6], [4, 5, 6, 7], [1, 2]]


def test_row_sampling_is_neutral_for_greedy_rows():
    from slimserve.config import SamplingParams
    from slimserve.engine.sequence import Sequence

    seqs = [
        Sequence("a", [1], SamplingParams(temperature=0.0), 0),
        Sequence("b", [1], SamplingParams(temperature=0.5, top_k=2), 1),
    ]
    sampling = RowSampling.of(seqs, torch.device("cpu"))
    probs = sampling.probs(torch.tensor([[0.0, 1.0, 2.0], [0.0, 1.0, 2.0]]))
    assert torch.allclose(probs[0], torch.tensor([0.0, 1.0, 2.0]).softmax(-1))
    assert probs[1, 0] == 0 and torch.allclose(probs[1, 1:], torch.tensor([2.0, 4.0]).softmax(-1))
