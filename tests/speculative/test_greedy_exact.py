"""Greedy output with every proposer equals plain greedy decoding token for token: mixed prompt lengths,
chunked prefill, prefix-cache hits, preemption in a tiny KV pool, the batch-size limit, and log-probs."""

import pytest
import torch

from slimserve import LLM, SamplingParams

MAX_NEW = 20


def prompts() -> list[list[int]]:
    g = torch.Generator().manual_seed(0)
    out = [torch.randint(3, 512, (n,), generator=g).tolist() for n in (1, 6, 19, 30)]
    # Repetitive prompts give prompt lookup something to find.
    out += [[5, 6, 7, 8, 9] * 5, [40, 41, 42] * 4 + [40]]
    return out


def specs(draft_folder, target_folder, head_folder) -> dict[str, dict]:
    return {
        "ngram": {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_min": 1},
        "draft-self": {"method": "draft", "model": target_folder, "num_speculative_tokens": 4},
        "draft-other": {"method": "draft", "model": draft_folder, "num_speculative_tokens": 2},
        "eagle": {"method": "eagle", "model": head_folder, "num_speculative_tokens": 3},
    }


@pytest.fixture(scope="module")
def reference(target_folder):
    llm = LLM(target_folder, dtype="float32", device="cpu", block_size=4)
    params = SamplingParams(temperature=0.0, max_tokens=MAX_NEW, ignore_eos=True, logprobs=1)
    return llm.generate(prompts(), params, use_tqdm=False)


@pytest.mark.parametrize("method", ["ngram", "draft-self", "draft-other", "eagle"])
@pytest.mark.parametrize("setting", ["batch", "preemption"])
def test_greedy_equals_plain_decoding(reference, target_folder, draft_folder, head_folder, method, setting):
    spec = specs(draft_folder, target_folder, head_folder)[method]
    kwargs = dict(block_size=4, max_num_batched_tokens=24)
    if setting == "preemption":
        kwargs.update(num_kv_blocks=14, max_num_batched_tokens=64)  # the longest sequence (50 tokens) fits alone
    llm = LLM(target_folder, dtype="float32", device="cpu", speculative=spec, **kwargs)
    params = SamplingParams(temperature=0.0, max_tokens=MAX_NEW, ignore_eos=True, logprobs=1)
    outs = llm.generate(prompts(), params, use_tqdm=False)
    for out, ref in zip(outs, reference):
        got, want = out.outputs[0], ref.outputs[0]
        assert got.token_ids == want.token_ids
        ours = [entry[t] for entry, t in zip(got.logprobs, got.token_ids)]
        theirs = [entry[t] for entry, t in zip(want.logprobs, want.token_ids)]
        assert torch.allclose(torch.tensor(ours), torch.tensor(theirs), atol=1e-4)
        assert len(got.logprobs[0]) >= 1
    engine = llm.engine
    stats = engine.speculative.stats
    assert stats.num_drafts > 0
    if method == "draft-self":
        assert stats.acceptance_rate == 1.0
    if setting == "preemption":
        assert engine.scheduler.num_preemptions > 0
    # Every block came back: rolled-back drafts leaked nothing.
    assert all(b.ref_count == 0 for b in engine.block_manager.blocks)
    assert outs[0].speculative is not None and outs[0].speculative.num_draft_tokens >= 0


def test_batch_size_limit_turns_speculation_off(target_folder, reference):
    spec = {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_min": 1, "disable_by_batch_size": 1}
    llm = LLM(target_folder, dtype="float32", device="cpu", block_size=4, speculative=spec)
    params = SamplingParams(temperature=0.0, max_tokens=MAX_NEW, ignore_eos=True)
    outs = llm.generate(prompts(), params, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == [r.outputs[0].token_ids for r in reference]
    # Six sequences run together: no step speculates until one remains.
    batched = llm.engine.speculative.stats.num_drafts
    outs = llm.generate([prompts()[4]], params, use_tqdm=False)
    assert outs[0].outputs[0].token_ids == reference[4].outputs[0].token_ids
    assert llm.engine.speculative.stats.num_drafts > batched


def test_stop_tokens_and_max_tokens_cut_accepted_drafts(target_folder, reference):
    want = reference[4].outputs[0].token_ids
    stop_at = want[7]
    spec = {"method": "draft", "model": target_folder, "num_speculative_tokens": 4}
    llm = LLM(target_folder, dtype="float32", device="cpu", block_size=4, speculative=spec)
    out = llm.generate(
        [prompts()[4]],
        SamplingParams(temperature=0.0, max_tokens=MAX_NEW, ignore_eos=True, stop_token_ids=[stop_at]),
        use_tqdm=False,
    )[0]
    assert out.outputs[0].token_ids == want[: want.index(stop_at) + 1]
    out = llm.generate([prompts()[4]], SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True), use_tqdm=False)
    assert out[0].outputs[0].token_ids == want[:6]
