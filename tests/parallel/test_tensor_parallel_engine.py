"""LLM(model, tensor_parallel_size=2) on the CPU (the engine spawns its second rank, gloo) gives the
single-process engine's greedy tokens and full-vocabulary log-probabilities, through chunked prefill,
multi-step decode windows and seeded sampling."""

import pytest

from slimserve import LLM, SamplingParams
from slimserve.errors import SlimserveError
from tests.parallel.engine_outputs import ENGINE, PROMPTS, assert_logprobs_equal
from tests.tiny_models import VOCAB, build_tiny_model


def run(llm: LLM) -> list:
    greedy = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True, logprobs=VOCAB)
    sampled = SamplingParams(temperature=1.0, top_p=0.9, seed=7, max_tokens=10, ignore_eos=True)
    return llm.generate(PROMPTS + PROMPTS[:1], [greedy] * len(PROMPTS) + [sampled], use_tqdm=False)


def test_two_ranks_equal_one(tmp_path):
    folder = build_tiny_model("qwen3", str(tmp_path / "qwen3"))
    expected = run(LLM(folder, **ENGINE))
    llm = LLM(folder, tensor_parallel_size=2, **ENGINE)
    got = run(llm)
    llm.engine.shutdown()
    assert all(not p.is_alive() for p in llm.engine.tensor_parallel.processes)
    for want, have in zip(expected, got):
        assert have.outputs[0].token_ids == want.outputs[0].token_ids
    for want, have in zip(expected[:-1], got[:-1]):
        assert all(len(step) == VOCAB for step in have.outputs[0].logprobs)
        assert_logprobs_equal(want, have)


def test_unsplittable_model_fails_before_spawning(llama_folder):
    with pytest.raises(SlimserveError, match="num_attention_heads=4 is not divisible by tensor_parallel_size=3"):
        LLM(llama_folder, dtype="float32", device="cpu", tensor_parallel_size=3)


def test_cli_flags_reach_the_engine_config():
    from slimserve.cli import build_parser, engine_kwargs

    args = build_parser().parse_args(["generate", "m", "--tensor-parallel-size", "4", "--enable-expert-parallel"])
    kwargs = engine_kwargs(args)
    assert kwargs["tensor_parallel_size"] == 4 and kwargs["enable_expert_parallel"] is True
    assert engine_kwargs(build_parser().parse_args(["generate", "m", "-tp", "2"]))["tensor_parallel_size"] == 2
