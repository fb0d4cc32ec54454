"""RoPE scaling for long contexts (linear, llama3, dynamic NTK, YaRN) equals transformers: the cos/sin
table row by row, and greedy generation (tokens and log-probabilities) running past the original context."""

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

from slimserve import LLM, SamplingParams
from slimserve.checkpoint.random_model import save_random_model
from slimserve.config import ModelConfig
from slimserve.layers.rotary import cos_sin_table

MAX_POSITION = 32
SCALINGS = {
    "linear": dict(rope_type="linear", factor=4.0),
    "llama3": dict(
        rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=8
    ),
    "dynamic": dict(rope_type="dynamic", factor=4.0),
    "yarn": dict(rope_type="yarn", factor=4.0, original_max_position_embeddings=MAX_POSITION),
    # DeepSeek-style: the attention factor from mscale / mscale_all_dim, other ramp bounds, no truncation.
    "yarn-mscale": dict(
        rope_type="yarn",
        factor=8.0,
        original_max_position_embeddings=16,
        mscale=1.0,
        mscale_all_dim=0.5,
        beta_fast=16,
        beta_slow=2,
        truncate=False,
    ),
}


def llama_config(scaling: dict):
    return AutoConfig.for_model(
        "llama",
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        max_position_embeddings=MAX_POSITION,
        rope_scaling=dict(scaling),
        bos_token_id=1,
        eos_token_id=2,
    )


@pytest.mark.parametrize("name", sorted(SCALINGS))
def test_cos_sin_table_equals_transformers(name):
    hf_config = llama_config(SCALINGS[name])
    ours = ModelConfig.from_dict(hf_config.to_dict() | {"architectures": ["LlamaForCausalLM"]})
    num_positions = ours.max_context_len
    assert num_positions > MAX_POSITION or name == "llama3"
    table = cos_sin_table(16, MAX_POSITION, num_positions, ours.rope_theta, ours.rope_scaling)
    rotary = LlamaRotaryEmbedding(hf_config)
    x = torch.zeros(1, 1, 16)
    if name == "dynamic":
        # transformers rescales from the longest position of each call: feed positions one at a time.
        rows = [rotary(x, torch.tensor([[p]])) for p in range(num_positions)]
        cos, sin = torch.cat([c[0] for c, _ in rows]), torch.cat([s[0] for _, s in rows])
    else:
        cos, sin = (t[0] for t in rotary(x, torch.arange(num_positions)[None]))
    # Angles reach ~128 rad, where one fp32 ulp is 7.6e-6.
    torch.testing.assert_close(table[:, :8], cos[:, :8], atol=1e-5, rtol=0)
    torch.testing.assert_close(table[:, 8:], sin[:, :8], atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", ["dynamic", "yarn"])
def test_generation_past_the_original_context_equals_transformers(name, tmp_path):
    folder = save_random_model(llama_config(SCALINGS[name]), str(tmp_path / name), std=0.15)
    prompt = torch.randint(3, 256, (20,), generator=torch.Generator().manual_seed(0)).tolist()
    new_tokens = 40  # positions 20..59: past max_position_embeddings=32
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    out = model.generate(
        torch.tensor([prompt]),
        max_new_tokens=new_tokens,
        do_sample=False,
        eos_token_id=None,
        pad_token_id=0,
        output_scores=True,
        return_dict_in_generate=True,
    )
    tokens = out.sequences[0, len(prompt) :].tolist()
    logprobs = torch.tensor([s[0].log_softmax(-1)[t].item() for s, t in zip(out.scores, tokens)])
    llm = LLM(folder, dtype="float32", device="cpu", block_size=4, max_num_batched_tokens=8)
    assert llm.engine.max_model_len == 128
    got = llm.generate(
        [prompt], SamplingParams(temperature=0.0, max_tokens=new_tokens, ignore_eos=True, logprobs=0), use_tqdm=False
    )[0].outputs[0]
    assert got.token_ids == tokens
    ours = torch.tensor([entry[t] for entry, t in zip(got.logprobs, got.token_ids)])
    torch.testing.assert_close(ours, logprobs, atol=1e-4, rtol=0)
