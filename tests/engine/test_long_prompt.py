"""A long prompt prefills in chunks of the step budget: no step attends more than the budget's queries,
logits are computed only for the last token of a finished prefill, and the output equals an unchunked
run. The KV-cache plan states blocks, tokens and concurrent full-length sequences."""

import torch

import slimserve.layers.attention as attention_module
from slimserve import LLM, SamplingParams
from slimserve.engine.engine import describe_kv_cache

BUDGET = 32


def test_long_prompt_prefills_in_bounded_chunks(llama_folder, monkeypatch):
    prompt = torch.randint(3, 512, (400,), generator=torch.Generator().manual_seed(0)).tolist()
    params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
    unchunked = LLM(llama_folder, dtype="float32", device="cpu", max_num_batched_tokens=512)
    expected = unchunked.generate([prompt], params, use_tqdm=False)[0].outputs[0].token_ids

    query_rows, logit_rows = [], []
    attend = attention_module.paged_attention

    def recording_attention(q, *args, **kwargs):
        query_rows.append(q.shape[0])
        return attend(q, *args, **kwargs)

    monkeypatch.setattr(attention_module, "paged_attention", recording_attention)
    llm = LLM(llama_folder, dtype="float32", device="cpu", max_num_batched_tokens=BUDGET)
    model = llm.engine.runner.model
    compute_logits = model.compute_logits
    monkeypatch.setattr(model, "compute_logits", lambda h: logit_rows.append(h.shape[0]) or compute_logits(h))
    out = llm.generate([prompt], params, use_tqdm=False)[0].outputs[0]
    assert out.token_ids == expected
    num_layers = llm.engine.model_config.num_hidden_layers
    assert len(query_rows) == num_layers * (-(-len(prompt) // BUDGET) + len(expected) - 1)
    assert max(query_rows) == BUDGET
    assert logit_rows == [1] * len(expected)


def test_kv_cache_plan_line(llama_folder):
    llm = LLM(llama_folder, dtype="float32", device="cpu", block_size=4, num_kv_blocks=30, max_model_len=50)
    assert llm.engine.kv_cache_plan.startswith("KV cache: 30 blocks of 4 tokens = 120 tokens (")
    assert llm.engine.kv_cache_plan.endswith("max_model_len 50: 2.31 sequences of that length fit at once")
    line = describe_kv_cache(1000, 16, 2**20, 4096, 8)
    assert "16000 tokens (0.98 GiB on each of 8 ranks)" in line
    assert "3.91 sequences" in line
