"""A mixture-of-experts model over two gloo ranks, with expert parallelism (whole experts split between the
ranks, tokens travel to them all-to-all) and with tensor parallelism (every expert split by features);
attention and the shared expert split by heads and features; same greedy tokens and log-probabilities as
the single-process engine."""

import pytest

from slimserve import LLM, SamplingParams
from tests.parallel.engine_outputs import ENGINE, PROMPTS, assert_logprobs_equal
from tests.tiny_models import VOCAB, build_tiny_model


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
        assert_logprobs_equal(want, have)
