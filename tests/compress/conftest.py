import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import (
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
)

VOCAB = 320


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """One token per byte (ids 3..258) plus <unk>, <s>, </s>: any text tokenizes, nothing to download."""
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for ch in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab[ch] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


# The sizes every tiny test model shares; each family adds what makes it that family.
SMALL = dict(
    hidden_size=128,
    intermediate_size=256,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=VOCAB,
    max_position_embeddings=512,
)


def llama_config(**kw) -> LlamaConfig:
    base = dict(SMALL, tie_word_embeddings=True)
    return LlamaConfig(**{**base, **kw})


def qwen2_config(**kw) -> Qwen2Config:
    base = dict(SMALL, tie_word_embeddings=False)
    return Qwen2Config(**{**base, **kw})


def gemma3_config(**kw) -> Gemma3TextConfig:
    """Gemma 3: sliding and full attention layers (different masks and rotary tables), norms scaling by 1 + w."""
    base = dict(SMALL, head_dim=32, sliding_window=8, layer_types=["sliding_attention", "full_attention"])
    return Gemma3TextConfig(**{**base, **kw})


FAMILIES = {
    "llama": (LlamaForCausalLM, llama_config),
    "qwen2": (Qwen2ForCausalLM, qwen2_config),
    "gemma3": (Gemma3ForCausalLM, gemma3_config),
}


def tiny_model(family: str = "llama", seed: int = 0, **kw):
    torch.manual_seed(seed)
    cls, make_config = FAMILIES[family]
    model = cls(make_config(**kw))
    with torch.no_grad():
        # Larger, uneven weights make the rounding error visible and give activations real outliers.
        for name, p in model.named_parameters():
            if "norm" not in name:
                p.normal_(0, 0.08)
                if p.ndim == 2:
                    p.mul_(torch.rand(p.shape[1]) * 2 + 0.1)
    return model.eval()


def samples(n: int = 4, length: int = 48, seed: int = 1) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, VOCAB, (1, length), generator=g) for _ in range(n)]


@pytest.fixture
def calib() -> list[torch.Tensor]:
    return samples()
