"""Prompt-lookup windows queued on the device: the device lookup equals the host one, and greedy output
through windows (eager on the CPU, and through emulated CUDA graphs) equals plain decoding, with mixed
lengths, preemption, stop tokens and max_tokens inside a window, and no leaked KV blocks."""

import random

import pytest
import torch

from slimserve import LLM, SamplingParams
from slimserve.engine.speculative import cuda_graphs
from slimserve.engine.speculative.ngram import prompt_lookup
from slimserve.engine.speculative.ngram_window import NgramWindows, device_prompt_lookup
from tests.speculative.test_graph_paths import FakeGraph, fake_capture
from tests.speculative.test_greedy_exact import MAX_NEW, prompts


@pytest.mark.parametrize("min_n,max_n,k", [(1, 1, 3), (1, 3, 4), (2, 4, 2), (3, 3, 5)])
def test_device_lookup_equals_host_lookup(min_n, max_n, k):
    rng = random.Random(min_n * 100 + max_n * 10 + k)
    seqs = [[rng.randrange(rng.choice([2, 3, 6, 50])) for _ in range(rng.randint(1, 40))] for _ in range(64)]
    width = 48
    history = torch.full((len(seqs), max_n - 1 + width), -1, dtype=torch.int32)
    for i, s in enumerate(seqs):
        history[i, max_n - 1 : max_n - 1 + len(s)] = torch.tensor(s, dtype=torch.int32)
    lengths = torch.tensor([len(s) for s in seqs])
    drafts, num = device_prompt_lookup(history, lengths, k, min_n, max_n)
    for i, s in enumerate(seqs):
        want = prompt_lookup(s, k, min_n, max_n)
        assert drafts[i, : num[i]].tolist() == want, (s, want)
        assert (drafts[i, num[i] :] == 0).all()


def count_window_runs(monkeypatch) -> list[int]:
    iterations: list[int] = []
    run = NgramWindows.run

    def counting(self, seqs, n):
        iterations.append(n)
        return run(self, seqs, n)

    monkeypatch.setattr(NgramWindows, "run", counting)
    return iterations


SPEC = {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_min": 1}


@pytest.fixture(scope="module")
def plain(target_folder) -> list[list[int]]:
    llm = LLM(target_folder, dtype="float32", device="cpu", block_size=4)
    params = SamplingParams(temperature=0.0, max_tokens=MAX_NEW, ignore_eos=True)
    return [o.outputs[0].token_ids for o in llm.generate(prompts(), params, use_tqdm=False)]


@pytest.mark.parametrize("setting", ["batch", "preemption", "graphs", "graphs-short-windows"])
def test_windows_equal_plain_decoding(monkeypatch, target_folder, plain, setting):
    iterations = count_window_runs(monkeypatch)
    kwargs = dict(block_size=4, num_decode_steps=4)
    if setting == "preemption":
        kwargs.update(num_kv_blocks=20, max_num_batched_tokens=64)
    if setting.startswith("graphs"):
        # Short windows: fewer iterations than captured batch sizes (each capture runs one iteration).
        kwargs["num_decode_steps"] = 2 if setting == "graphs-short-windows" else 4
        monkeypatch.setattr(cuda_graphs, "wants_graphs", lambda runner: True)
        monkeypatch.setattr(cuda_graphs, "capture", fake_capture)
        kwargs.update(max_num_seqs=8)
        FakeGraph.replays = 0
    llm = LLM(target_folder, dtype="float32", device="cpu", speculative=SPEC, **kwargs)
    params = SamplingParams(temperature=0.0, max_tokens=MAX_NEW, ignore_eos=True)
    got = [o.outputs[0].token_ids for o in llm.generate(prompts(), params, use_tqdm=False)]
    assert got == plain
    engine = llm.engine
    assert max(iterations) > 1 and engine.speculative.stats.num_drafts > 0
    assert all(b.ref_count == 0 for b in engine.block_manager.blocks)
    if setting == "preemption":
        assert engine.scheduler.num_preemptions > 0
    if setting.startswith("graphs"):
        assert FakeGraph.replays >= sum(iterations)


def test_window_stops_at_stop_token_and_max_tokens(monkeypatch, target_folder, plain):
    iterations = count_window_runs(monkeypatch)
    want = plain[4]
    llm = LLM(target_folder, dtype="float32", device="cpu", block_size=4, num_decode_steps=8, speculative=SPEC)
    stop = SamplingParams(temperature=0.0, max_tokens=MAX_NEW, ignore_eos=True, stop_token_ids=[want[9]])
    out = llm.generate([prompts()[4]], stop, use_tqdm=False)[0]
    assert out.outputs[0].token_ids == want[: want.index(want[9]) + 1]
    out = llm.generate([prompts()[4]], SamplingParams(temperature=0.0, max_tokens=7, ignore_eos=True), use_tqdm=False)
    assert out[0].outputs[0].token_ids == want[:7]
    assert iterations and all(b.ref_count == 0 for b in llm.engine.block_manager.blocks)
    # Iterations after the request ended are not counted: at most one verification per emitted token.
    stats = llm.engine.speculative.stats
    assert stats.num_emitted_tokens <= len(want[: want.index(want[9]) + 1]) + 7


def test_sampled_requests_do_not_use_windows(monkeypatch, target_folder):
    iterations = count_window_runs(monkeypatch)
    llm = LLM(target_folder, dtype="float32", device="cpu", block_size=4, num_decode_steps=4, speculative=SPEC)
    params = SamplingParams(temperature=0.8, max_tokens=8, seed=3)
    llm.generate(prompts()[4:], params, use_tqdm=False)
    assert iterations == []
