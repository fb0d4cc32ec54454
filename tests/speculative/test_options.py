"""Speculative options: parsing and errors, the CLI flag, sampled requests through the engine."""

import subprocess
import sys

import pytest

from slimserve import LLM, SamplingParams
from slimserve.cli import build_parser, engine_kwargs
from slimserve.config import EngineConfig
from slimserve.engine.speculative import SpeculativeConfig
from slimserve.errors import SlimserveError


def test_parse_forms_and_errors():
    cfg = SpeculativeConfig.parse('{"method": "ngram", "num_speculative_tokens": 5}')
    assert cfg == SpeculativeConfig(method="ngram", num_speculative_tokens=5)
    assert SpeculativeConfig.parse(None) is None and SpeculativeConfig.parse({}) is None
    assert EngineConfig(model="m", speculative_config={"method": "ngram"}).speculative_config.method == "ngram"
    with pytest.raises(SlimserveError, match="tensor_parallel_size 1"):
        EngineConfig(model="m", speculative_config={"method": "ngram"}, tensor_parallel_size=2)
    for bad, message in [
        ("{not json", "not valid JSON"),
        ({"method": "medusa"}, "unknown"),
        ({"method": "draft"}, "needs a 'model'"),
        ({"method": "ngram", "k": 3}, "unknown speculative config keys: k"),
        ({"num_speculative_tokens": 3}, "needs a 'method'"),
        ({"method": "ngram", "num_speculative_tokens": 0}, "must be positive"),
        ("[1]", "JSON object"),
    ]:
        with pytest.raises(SlimserveError, match=message):
            SpeculativeConfig.parse(bad)


def test_cli_flag_reaches_the_engine_and_bad_json_is_one_line(target_folder):
    args = build_parser().parse_args(["generate", "m", "--speculative-config", '{"method": "ngram"}'])
    assert engine_kwargs(args)["speculative_config"] == '{"method": "ngram"}'
    proc = subprocess.run(
        [sys.executable, "-m", "slimserve.cli", "generate", target_folder, "--device", "cpu", "--prompt", "x",
         "--speculative-config", '{"method": "eagle"}'],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == ["slimserve generate: error: speculative method 'eagle' needs a 'model'"]


def test_sampled_requests_are_reproducible_and_report_acceptance(target_folder):
    spec = {"method": "draft", "model": target_folder, "num_speculative_tokens": 3}
    llm = LLM(target_folder, dtype="float32", device="cpu", block_size=4, speculative=spec)
    prompts = [[5, 6, 7, 8] * 3, [9, 10, 11]]
    params = SamplingParams(temperature=0.8, top_p=0.9, seed=7, max_tokens=12, ignore_eos=True)
    first = llm.generate(prompts, params, use_tqdm=False)
    again = llm.generate(prompts, params, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in first] == [o.outputs[0].token_ids for o in again]
    assert all(len(o.outputs[0].token_ids) == 12 for o in first)
    # The draft is the target itself: every draft it samples is accepted.
    stats = first[0].speculative
    assert stats.num_draft_tokens > 0 and stats.acceptance_rate == 1.0 and stats.mean_accepted_length > 1
