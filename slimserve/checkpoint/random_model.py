"""Random-weight Hugging Face folders of real model shapes, for speed benchmarks and exactness tests
(random weights prove shapes and speed, never quality)."""

from __future__ import annotations

import os

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoModelForCausalLM, PretrainedConfig, PreTrainedTokenizerFast

CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }} {{ m['content'] }} {% endfor %}"
    "{% if add_generation_prompt %}assistant {% endif %}"
)


def word_level_tokenizer(vocab_size: int) -> PreTrainedTokenizerFast:
    """A tokenizer whose token i is the word `w{i}`, except 0, 1, 2: unk, bos, eos."""
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2} | {f"w{i}": i for i in range(3, vocab_size)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", chat_template=CHAT_TEMPLATE
    )


def save_random_model(
    config: PretrainedConfig,
    folder: str,
    dtype: torch.dtype = torch.float32,
    device: str = "cpu",
    std: float | None = None,
    seed: int = 0,
) -> str:
    """Write a randomly initialised model of `config` (with a word-level tokenizer) into `folder`.

    `std` overrides the init scale of every non-norm weight: larger weights spread the logits so that
    greedy choices are not near-ties."""
    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    if std is not None:
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "norm" not in name:
                    param.normal_(0.0, std)
    os.makedirs(folder, exist_ok=True)
    model.save_pretrained(folder)
    word_level_tokenizer(config.vocab_size).save_pretrained(folder)
    return folder
