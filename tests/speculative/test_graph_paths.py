"""The CUDA-graph paths of verification and of the draft head, emulated on the CPU: a fake graph re-runs the
captured function into the captured output tensors, which is what a replay does on the GPU. Greedy output
must still equal plain decoding, and the graphs must have been replayed."""

import pytest
import torch

from slimserve import LLM, SamplingParams
from slimserve.engine.speculative import cuda_graphs
from tests.speculative.test_greedy_exact import prompts


class FakeGraph:
    replays = 0

    def __init__(self, fn, outputs) -> None:
        self.fn, self.outputs = fn, outputs

    def replay(self) -> None:
        FakeGraph.replays += 1
        with torch.inference_mode():
            for old, new in zip(self.outputs, self.fn()):
                old.copy_(new)

    def pool(self) -> None:
        return None


def fake_capture(fn, pool):
    with torch.inference_mode():
        outputs = fn()
    return FakeGraph(fn, outputs), outputs


@pytest.mark.parametrize("method", ["ngram", "eagle"])
def test_graph_paths_equal_plain_decoding(monkeypatch, target_folder, head_folder, method):
    monkeypatch.setattr(cuda_graphs, "wants_graphs", lambda runner: True)
    monkeypatch.setattr(cuda_graphs, "capture", fake_capture)
    spec = {"method": method, "num_speculative_tokens": 3, "prompt_lookup_min": 1, "disable_by_batch_size": 4}
    if method == "eagle":
        spec = {"method": "eagle", "model": head_folder, "num_speculative_tokens": 3, "disable_by_batch_size": 4}
    params = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)
    plain = LLM(target_folder, dtype="float32", device="cpu", block_size=4)
    want = [o.outputs[0].token_ids for o in plain.generate(prompts()[2:], params, use_tqdm=False)]
    llm = LLM(target_folder, dtype="float32", device="cpu", block_size=4, max_num_seqs=8, speculative=spec)
    FakeGraph.replays = 0
    got = [o.outputs[0].token_ids for o in llm.generate(prompts()[2:], params, use_tqdm=False)]
    assert got == want
    assert FakeGraph.replays > 0 and llm.engine.speculative.stats.num_drafts > 0
