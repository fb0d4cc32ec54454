"""The engine's greedy output equals transformers' token for token, and its log-probabilities match,
for every supported family, with batching, chunked prefill, preemption and prefix-cache hits."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from slimserve import LLM, SamplingParams
from tests.tiny_models import FAMILIES, build_tiny_model

MAX_NEW = 12


def transformers_greedy(folder: str, prompts: list[list[int]]) -> list[tuple[list[int], list[float]]]:
    """Greedy continuation and the log-probability of each chosen token, one prompt at a time."""
    model = AutoModelForCausalLM.from_pretrained(folder, torch_dtype=torch.float32).eval()
    results = []
    for prompt in prompts:
        out = model.generate(
            torch.tensor([prompt]),
            max_new_tokens=MAX_NEW,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=0,
            output_scores=True,
            return_dict_in_generate=True,
        )
        tokens = out.sequences[0, len(prompt) :].tolist()
        logprobs = [s[0].float().log_softmax(-1)[t].item() for s, t in zip(out.scores, tokens)]
        results.append((tokens, logprobs))
    return results


def make_prompts(seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    shared = torch.randint(3, 512, (21,), generator=g).tolist()
    lengths = [1, 5, 17, 33, 40]
    prompts = [torch.randint(3, 512, (n,), generator=g).tolist() for n in lengths]
    # Two prompts share a prefix longer than several blocks: the second reuses cached blocks.
    prompts += [shared + [7, 8, 9], shared + [10, 11]]
    return prompts


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family_folder(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(request.param)
    return build_tiny_model(request.param, str(folder))


def check_engine(folder: str, expected, prompts, **engine_kwargs) -> LLM:
    llm = LLM(folder, dtype="float32", device="cpu", **engine_kwargs)
    params = SamplingParams(temperature=0.0, max_tokens=MAX_NEW, ignore_eos=True, logprobs=0)
    outs = llm.generate(prompts, params, use_tqdm=False)
    for out, (tokens, logprobs) in zip(outs, expected):
        got = out.outputs[0]
        assert got.token_ids == tokens
        ours = [entry[t] for entry, t in zip(got.logprobs, got.token_ids)]
        assert torch.allclose(torch.tensor(ours), torch.tensor(logprobs), atol=1e-4, rtol=0)
        assert got.finish_reason == "length"
    return llm


@pytest.mark.parametrize("decode_steps", [1, 4])
def test_batched_with_chunked_prefill_and_prefix_cache(family_folder, decode_steps):
    prompts = make_prompts(0)
    expected = transformers_greedy(family_folder, prompts)
    llm = check_engine(
        family_folder, expected, prompts, block_size=4, max_num_batched_tokens=24, num_decode_steps=decode_steps
    )
    # Run again: the prompts' full blocks are now cached and must give the same output.
    hits_before = llm.engine.block_manager.prefix_hits
    outs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=MAX_NEW, ignore_eos=True), use_tqdm=False)
    assert llm.engine.block_manager.prefix_hits > hits_before
    assert [o.outputs[0].token_ids for o in outs] == [e[0] for e in expected]
    assert all(o.num_cached_tokens > 0 for o in outs if len(o.prompt_token_ids) > 4)


@pytest.mark.parametrize("decode_steps", [1, 3])
def test_preemption_with_tiny_kv_pool(family_folder, decode_steps):
    prompts = make_prompts(1)
    expected = transformers_greedy(family_folder, prompts)
    # 16 blocks of 4 tokens: the longest sequence (52 tokens) fits alone, the batch does not.
    llm = check_engine(family_folder, expected, prompts, block_size=4, num_kv_blocks=16, num_decode_steps=decode_steps)
    assert llm.engine.scheduler.num_preemptions > 0
    assert llm.engine.block_manager.num_free_blocks == 16
