"""Self-calibration: when the user has no data, the model writes its own calibration text, sampled with
temperature from short, varied prompts, so the activations seen are the ones the model itself produces."""

from __future__ import annotations

import torch
from torch import nn

from slimserve.compress.errors import CalibrationError

PROMPTS = (
    "The history of",
    "def main():",
    "Dear Sir,",
    "In mathematics, a",
    "Once upon a time",
    "The recipe calls for",
    "Question: Why is the sky blue?\nAnswer:",
    "import numpy as np\n",
    "The following table shows",
    "Chapter 1\n\n",
    "The weather today",
    "To install the package,",
    "In 1850, the city of",
    "The patient presented with",
    "Here is a short poem about",
    "SELECT name FROM",
)


@torch.no_grad()
def self_samples(
    model: nn.Module,
    tokenizer,
    num_samples: int,
    seq_len: int,
    temperature: float = 0.8,
    batch_size: int = 16,
    seed: int = 0,
) -> list[torch.Tensor]:
    """num_samples sequences of exactly seq_len tokens: a prompt (after BOS when the model has one) and
    its sampled continuation. End-of-text is suppressed until the sequence is full."""
    if num_samples <= 0 or seq_len <= 8:
        raise CalibrationError(f"self-calibration needs samples of more than 8 tokens, got {num_samples} x {seq_len}")
    torch.manual_seed(seed)
    device = next(model.parameters()).device
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id or 0
    prompts = [
        (bos + tokenizer(PROMPTS[i % len(PROMPTS)], add_special_tokens=False)["input_ids"])[: seq_len // 2]
        for i in range(num_samples)
    ]
    out: list[torch.Tensor] = []
    for start in range(0, num_samples, batch_size):
        batch = prompts[start : start + batch_size]
        width = max(len(p) for p in batch)
        # Prompts are padded on the left so that every row continues right after its own prompt.
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in batch], device=device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch], device=device)
        new = seq_len - min(len(p) for p in batch)
        gen = model.generate(
            ids,
            attention_mask=mask,
            do_sample=True,
            temperature=temperature,
            top_k=0,
            max_new_tokens=new,
            min_new_tokens=new,
            pad_token_id=pad,
        )
        for row, p in zip(gen, batch):
            out.append(row[width - len(p) :][:seq_len].unsqueeze(0).cpu())
    return out
