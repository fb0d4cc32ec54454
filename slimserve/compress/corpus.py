"""Calibration text: the generic corpus shipped in the package (public-domain King James Bible and Jane Austen
excerpts; Persuasion is held out for evaluation), cut into token windows."""

from __future__ import annotations

from importlib import resources

import torch

from slimserve.compress.errors import CalibrationError

CORPUS_FILES = ("kjv.txt", "austen.txt")


def generic_texts() -> list[str]:
    root = resources.files("slimserve.compress.data")
    return [root.joinpath(name).read_text(encoding="utf-8") for name in CORPUS_FILES]


def token_windows(texts: list[str], tokenizer, num_samples: int, seq_len: int, seed: int = 0) -> list[torch.Tensor]:
    """num_samples windows of seq_len tokens at random offsets, taken from the texts in turn."""
    if num_samples <= 0 or seq_len <= 1:
        raise CalibrationError(f"need at least one sample of 2+ tokens, got {num_samples} x {seq_len}")
    streams = [torch.tensor(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts if t.strip()]
    streams = [s for s in streams if s.numel() > seq_len]
    if not streams:
        raise CalibrationError(f"calibration text is shorter than one window of {seq_len} tokens")
    gen = torch.Generator().manual_seed(seed)
    out = []
    for i in range(num_samples):
        s = streams[i % len(streams)]
        start = int(torch.randint(0, s.numel() - seq_len, (1,), generator=gen))
        out.append(s[start : start + seq_len].unsqueeze(0))
    return out


def generic_samples(tokenizer, num_samples: int, seq_len: int, seed: int = 0) -> list[torch.Tensor]:
    return token_windows(generic_texts(), tokenizer, num_samples, seq_len, seed)
