"""Shape surgery on `transformers` causal LMs: a new model of the same class from an edited config, filled
with edited tensors, and its atomic save as an ordinary Hugging Face folder."""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path
from typing import Any

import torch
from torch import nn

from slimserve.compress.errors import OutputExistsError
from slimserve.compress.writer import check_output
from slimserve.errors import UnsupportedArchitectureError

# The decoder families whose layers are norm -> q/k/v -> o and norm -> gate/up -> down.
SUPPORTED = ("llama", "mistral", "qwen2", "qwen3")


def check_supported(model: nn.Module) -> None:
    kind = model.config.model_type
    if kind not in SUPPORTED:
        raise UnsupportedArchitectureError(f"structural edits support {', '.join(SUPPORTED)} models, not {kind!r}")


def head_dim(config: Any) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def rebuild(model: nn.Module, updates: dict[str, Any], state: dict[str, torch.Tensor]) -> nn.Module:
    """A model of the same class with config fields `updates`, holding exactly `state`."""
    from transformers import AutoModelForCausalLM

    cfg = model.config.to_dict()
    cfg.pop("quantization_config", None)
    cfg.update(updates)
    config = type(model.config).from_dict(cfg)
    dtype = next(model.parameters()).dtype
    # Built for real (not on the meta device): non-persistent buffers such as rotary tables need values.
    new = AutoModelForCausalLM.from_config(config, dtype=dtype)
    new.load_state_dict(state, strict=True)
    if config.tie_word_embeddings:
        new.tie_weights()
    if getattr(model, "generation_config", None) is not None:
        new.generation_config = model.generation_config
    return new.eval()


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def save_folder(model: nn.Module, out: str | os.PathLike, tokenizer: Any = None, extra: dict | None = None) -> Path:
    """save_pretrained into a hidden sibling folder, renamed to `out` once complete."""
    import json

    path = check_output(out)
    tmp = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if extra is not None:
            with open(tmp / "slimserve_report.json", "w") as f:
                json.dump(extra, f, indent=2)
        if path.exists():
            raise OutputExistsError(f"{path}: output folder appeared while writing; nothing was saved")
        os.rename(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path
