"""Tiny random models built from the configs of real checkpoints (their rope, norm, bias, tying and
attention layouts; only the sizes shrunk), saved as Hugging Face folders with a small tokenizer."""

from __future__ import annotations

from transformers import AutoConfig

from slimserve.checkpoint.random_model import save_random_model

VOCAB = 512
_SMALL = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    max_position_embeddings=512,
    bos_token_id=1,
    eos_token_id=2,
)

# Per family: the model type and the fields of the real config that change the computation.
FAMILIES: dict[str, dict] = {
    "llama2": dict(model_type="llama", num_key_value_heads=4, rms_norm_eps=1e-5, rope_theta=10000.0),
    "llama3.1": dict(
        model_type="llama",
        num_key_value_heads=2,
        rms_norm_eps=1e-5,
        rope_theta=500000.0,
        rope_scaling=dict(
            rope_type="llama3",
            factor=8.0,
            low_freq_factor=1.0,
            high_freq_factor=4.0,
            original_max_position_embeddings=64,
        ),
    ),
    "llama3.2": dict(
        model_type="llama",
        num_key_value_heads=2,
        rms_norm_eps=1e-5,
        rope_theta=500000.0,
        tie_word_embeddings=True,
        head_dim=32,
        rope_scaling=dict(
            rope_type="llama3",
            factor=32.0,
            low_freq_factor=1.0,
            high_freq_factor=4.0,
            original_max_position_embeddings=64,
        ),
    ),
    "mistral": dict(
        model_type="mistral", num_key_value_heads=2, rms_norm_eps=1e-5, rope_theta=1000000.0, sliding_window=None
    ),
    "qwen2.5": dict(
        model_type="qwen2", num_key_value_heads=2, rms_norm_eps=1e-6, rope_theta=1000000.0, tie_word_embeddings=True
    ),
    "qwen3": dict(
        model_type="qwen3",
        num_key_value_heads=2,
        rms_norm_eps=1e-6,
        rope_theta=1000000.0,
        head_dim=32,
        tie_word_embeddings=True,
    ),
    "mqa": dict(model_type="llama", num_key_value_heads=1, rms_norm_eps=1e-5, rope_theta=10000.0),
}

# Mixture-of-experts families: the routing of the real checkpoints (experts, top-k, renormalisation, shared
# expert) with the sizes shrunk.
MOE_FAMILIES: dict[str, dict] = {
    "mixtral": dict(  # Mixtral-8x7B: 8 experts, top-2, always renormalised
        model_type="mixtral",
        num_key_value_heads=2,
        rms_norm_eps=1e-5,
        rope_theta=1000000.0,
        sliding_window=None,
        num_local_experts=8,
        num_experts_per_tok=2,
        intermediate_size=48,
    ),
    "qwen2-moe": dict(  # Qwen1.5-MoE-A2.7B: 60 experts, top-4, not renormalised, gated shared expert
        model_type="qwen2_moe",
        num_key_value_heads=4,
        rms_norm_eps=1e-6,
        rope_theta=1000000.0,
        num_experts=60,
        num_experts_per_tok=4,
        norm_topk_prob=False,
        moe_intermediate_size=24,
        shared_expert_intermediate_size=96,
    ),
    "qwen3-moe": dict(  # Qwen3-30B-A3B: 128 experts, top-8, renormalised, q/k norm
        model_type="qwen3_moe",
        num_key_value_heads=2,
        rms_norm_eps=1e-6,
        rope_theta=1000000.0,
        head_dim=32,
        num_experts=128,
        num_experts_per_tok=8,
        norm_topk_prob=True,
        moe_intermediate_size=16,
    ),
}


def build_tiny_model(family: str, folder: str, seed: int = 0) -> str:
    """Write a random model of `family` into `folder` (HF layout) and return the folder."""
    fields = dict((FAMILIES | MOE_FAMILIES)[family])
    model_type = fields.pop("model_type")
    config = AutoConfig.for_model(model_type, **(_SMALL | fields))
    return save_random_model(config, folder, std=0.15, seed=seed)
