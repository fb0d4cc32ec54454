"""Self-calibration: when the user has no data, the model writes its own calibration text, so the activations
seen are the ones the model itself produces. As in data-free quantization (LLM-QAT and after), the text is
sampled at temperature 1 from the model's full distribution, from many different starts: plain-text openings
and, for chat models, user requests in the model's own chat template, over prose, code, math, dialogue and
other languages."""

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
CHAT_REQUESTS = (
    "Write a short story about a lighthouse keeper who finds a message in a bottle.",
    "Explain how a hash map handles collisions, with an example in Python.",
    "Write a C function that reverses a linked list, and explain it line by line.",
    "What are the main causes of inflation? Answer in a few paragraphs.",
    "Translate into French and German: 'The train leaves at seven, so we should hurry.'",
    "Solve step by step: a rectangle's length is three times its width and its perimeter is 48 cm.",
    "Write a polite email asking a landlord to repair a leaking roof.",
    "Summarize the plot of a classic novel you like, then discuss its main themes.",
    "Write a bash script that backs up a directory and keeps only the last five backups.",
    "What is the difference between TCP and UDP? Give examples of when to use each.",
    "Write a dialogue between a detective and a suspect in a small village.",
    "Describe the water cycle for a ten-year-old.",
    "Implement binary search in JavaScript and write unit tests for it.",
    "Give me a recipe for a vegetarian curry, with a shopping list.",
    "Explain the proof that there are infinitely many prime numbers.",
    "Write a SQL query that finds the top three customers by total order value per month.",
    "What happened during the French Revolution? Keep it to the key events.",
    "用中文介绍一下长城的历史。",
    "Write a haiku sequence about the four seasons.",
    "Review this code and suggest improvements: for i in range(len(a)): print(a[i])",
    "How do vaccines train the immune system?",
    "Write a Rust program that counts word frequencies in a text file.",
    "Plan a three-day trip to Rome with a modest budget.",
    "Explain gradient descent and why the learning rate matters.",
    "Escribe un breve poema sobre el mar.",
    "Write a cover letter for a junior data analyst position.",
    "Derive the formula for the sum of an arithmetic series.",
    "Explain what a Dockerfile is and write one for a Flask app.",
    "Argue for and against a four-day work week.",
    "Write the opening chapter of a fantasy novel.",
    "How does public-key cryptography work?",
    "Write a Java class for a bank account with deposits, withdrawals and an overdraft limit.",
)


def _prompts(tokenizer, count: int, seq_len: int, seed: int) -> list[list[int]]:
    """`count` prompts: chat requests (in the tokenizer's chat template, when it has one) alternating with
    plain openings, each kind in a seeded order, so that every batch mixes both."""
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    plain = [bos + tokenizer(p, add_special_tokens=False)["input_ids"] for p in PROMPTS]
    chats = []
    for request in CHAT_REQUESTS:
        if tokenizer.chat_template:
            chat = [{"role": "user", "content": request}]
            text = tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
            chats.append(tokenizer(text, add_special_tokens=False)["input_ids"])
        else:
            chats.append(bos + tokenizer(request, add_special_tokens=False)["input_ids"])
    gen = torch.Generator().manual_seed(seed)
    kinds = [[ids[i] for i in torch.randperm(len(ids), generator=gen).tolist()] for ids in (chats, plain)]
    texts = [k[i] for i in range(max(map(len, kinds))) for k in kinds if i < len(k)]
    return [(texts[i % len(texts)] or bos or [0])[: seq_len // 2] for i in range(count)]


@torch.no_grad()
def self_samples(
    model: nn.Module,
    tokenizer,
    num_samples: int,
    seq_len: int,
    temperature: float = 1.0,
    batch_size: int = 16,
    seed: int = 0,
) -> list[torch.Tensor]:
    """num_samples sequences of exactly seq_len tokens: a prompt and its sampled continuation. End-of-text is
    suppressed until the sequence is full."""
    if num_samples <= 0 or seq_len <= 8:
        raise CalibrationError(f"self-calibration needs samples of more than 8 tokens, got {num_samples} x {seq_len}")
    torch.manual_seed(seed)
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id or 0
    prompts = _prompts(tokenizer, num_samples, seq_len, seed)
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
            top_p=1.0,
            max_new_tokens=new,
            min_new_tokens=new,
            pad_token_id=pad,
        )
        for row, p in zip(gen, batch):
            out.append(row[width - len(p) :][:seq_len].unsqueeze(0).cpu())
    return out
