"""Sampling: reproducible with a seed, degenerate settings equal greedy, and the filters keep the right mass."""

import pytest
import torch

from slimserve import LLM, SamplingParams
from slimserve.config import SamplingParams as Params
from slimserve.errors import SamplingParamsError
from slimserve.layers.sampler import Sampler, filter_logits

PROMPTS = [[5, 6, 7, 8], [9, 10], [11, 12, 13, 14, 15, 16, 17]]


@pytest.fixture(scope="module", params=[1, 3], ids=["step", "window"])
def llm(llama_folder, request):
    return LLM(llama_folder, dtype="float32", device="cpu", block_size=4, num_decode_steps=request.param)


def texts(outs):
    return [o.outputs[0].token_ids for o in outs]


def test_same_seed_same_output_whatever_the_batch(llm):
    params = SamplingParams(temperature=1.0, seed=1234, max_tokens=10, ignore_eos=True)
    alone = texts(llm.generate([PROMPTS[0]], params, use_tqdm=False))[0]
    batched = texts(llm.generate(PROMPTS, params, use_tqdm=False))
    assert batched[0] == alone
    other_seed = texts(
        llm.generate(
            [PROMPTS[0]], SamplingParams(temperature=1.0, seed=99, max_tokens=10, ignore_eos=True), use_tqdm=False
        )
    )[0]
    assert other_seed != alone


def test_degenerate_sampling_equals_greedy(llm):
    greedy = texts(
        llm.generate(PROMPTS, SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True), use_tqdm=False)
    )
    for params in (
        SamplingParams(temperature=1.0, top_k=1, max_tokens=8, ignore_eos=True),
        SamplingParams(temperature=1e-5, max_tokens=8, ignore_eos=True),
        SamplingParams(temperature=1.0, top_p=1e-6, max_tokens=8, ignore_eos=True),
        SamplingParams(temperature=1.0, min_p=1.0, max_tokens=8, ignore_eos=True),
    ):
        assert texts(llm.generate(PROMPTS, params, use_tqdm=False)) == greedy


def test_stop_token_ids_and_max_tokens(llm):
    greedy = llm.generate([PROMPTS[0]], SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True), use_tqdm=False)[
        0
    ].outputs[0]
    stop_at = greedy.token_ids[3]
    first = greedy.token_ids.index(stop_at)
    out = llm.generate(
        [PROMPTS[0]],
        SamplingParams(temperature=0.0, max_tokens=8, stop_token_ids=[stop_at], ignore_eos=True),
        use_tqdm=False,
    )[0].outputs[0]
    assert out.token_ids == greedy.token_ids[: first + 1]
    assert (out.finish_reason, out.stop_reason) == ("stop", stop_at)
    assert greedy.finish_reason == "length" and len(greedy.token_ids) == 8


def test_stop_strings_cut_the_text(llm):
    greedy = llm.generate([PROMPTS[1]], SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True), use_tqdm=False)[
        0
    ].outputs[0]
    words = greedy.text.split()
    stop = words[2]
    out = llm.generate(
        [PROMPTS[1]], SamplingParams(temperature=0.0, max_tokens=8, stop=[stop], ignore_eos=True), use_tqdm=False
    )[0].outputs[0]
    assert out.finish_reason == "stop" and out.stop_reason == stop
    assert out.text == greedy.text[: greedy.text.index(stop)]


def test_filters_keep_the_right_tokens():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    logits = probs.log()
    one = torch.ones(1)

    def kept(top_k=0, top_p=1.0, min_p=0.0):
        out = filter_logits(logits, torch.tensor([top_k]), one * top_p, one * min_p)
        return torch.isfinite(out[0]).nonzero().flatten().tolist()

    assert kept(top_k=2) == [0, 1]
    assert kept(top_p=0.8) == [0, 1]  # 0.5 + 0.3 reaches 0.8: the third token is not needed
    assert kept(top_p=0.81) == [0, 1, 2]
    assert kept(min_p=0.5) == [0, 1]  # 0.3 >= 0.5 * 0.5, 0.15 is not
    assert kept(top_k=3, top_p=0.5) == [0]


def test_sampled_frequencies_follow_the_distribution():
    torch.manual_seed(0)
    logits = torch.randn(1, 6) * 1.5
    n = 20000
    sampler = Sampler(seed=0, device=torch.device("cpu"))
    params = [Params(temperature=0.7, top_p=0.9)] * n
    out = sampler.sample(logits.expand(n, -1).clone(), sampler.prepare(params, [None] * n))
    counts = torch.bincount(out.token_ids, minlength=6).float()
    expected = filter_logits(logits / 0.7, torch.zeros(1), torch.tensor([0.9]), torch.zeros(1)).softmax(-1)[0] * n
    support = expected > 0
    assert counts[~support].sum() == 0
    chi2 = ((counts[support] - expected[support]) ** 2 / expected[support]).sum().item()
    assert chi2 < 20.5  # 99.9% quantile of chi-square with <= 5 degrees of freedom


@pytest.mark.parametrize(
    "kwargs",
    [dict(top_p=0.0), dict(top_p=1.5), dict(temperature=-0.1), dict(max_tokens=0), dict(top_k=-2), dict(min_p=2.0)],
)
def test_impossible_parameters_are_rejected(kwargs):
    with pytest.raises(SamplingParamsError):
        SamplingParams(**kwargs)
