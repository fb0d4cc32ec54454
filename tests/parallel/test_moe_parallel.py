"""A mixture-of-experts model over two gloo ranks, with expert parallelism (whole experts split between the
ranks, tokens travel to them all-to-all) and with tensor parallelism (every expert split by features);
attention and the shared expert split by heads and features; same greedy tokens and log-probabilities as
the single-process engine."""

import pytest
import torch

from slimserve import LLM, SamplingParams
from tests.tiny_models import VOCAB, build_tiny_model

PROMPTS = [[5, 6, 7, 8], list(range(10, 40)), [300, 301, 302, 303, 304, 305, 306]]
ENGINE = dict(dtype="float32", device="cpu", block_size=4, max_num_batched_tokens=16, num_decode_steps=4)


@pytest.mark.parametrize("expert_parallel", [True, False], ids=["ep", "tp"])
def test_moe_two_ranks_equal_one(tmp_path, expert_parallel):
    folder = build_tiny_model("qwen2-moe", str(tmp_path / "qwen2-moe"))
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True, logprobs=VOCAB)
    expected = LLM(folder, **ENGINE).generate(PROMPTS, params, use_tqdm=False)
    llm = LLM(folder, tensor_parallel_size=2, enable_expert_parallel=expert_parallel, **ENGINE)
    got = llm.generate(PROMPTS, params, use_tqdm=False)
    llm.engine.shutdown()
    for want, have in zip(expected, got):
        assert have.outputs[0].token_ids == want.outputs[0].token_ids
        for step_want, step_have in zip(want.outputs[0].logprobs, have.outputs[0].logprobs):
            ids = sorted(step_want)
            a = torch.tensor([step_want[i] for i in ids])
            b = torch.tensor([step_have.get(i, float("nan")) for i in ids])
            torch.testing.assert_close(b, a, atol=1e-5, rtol=0)
