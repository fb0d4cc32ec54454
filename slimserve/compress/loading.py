"""Open a causal LM for compression or evaluation: a Hugging Face folder (plain or compressed-tensors) or a
GGUF file."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from slimserve.errors import ModelNotFoundError

WEIGHT_PATTERNS = ("*.safetensors", "pytorch_model*.bin", "model.safetensors.index.json")


def _gguf_source(path: Path) -> tuple[str, dict[str, Any]]:
    try:
        from slimserve.checkpoint.resolve import resolve_model
    except ImportError:
        # Until the checkpoint converter exists, transformers reads the GGUF file and dequantizes it.
        return str(path.parent), {"gguf_file": path.name}
    return str(resolve_model(str(path))), {}


def _check_folder(path: Path) -> dict[str, Any]:
    if not (path / "config.json").is_file():
        raise ModelNotFoundError(f"{path}: no config.json in the model folder")
    if not any(any(path.glob(p)) for p in WEIGHT_PATTERNS):
        raise ModelNotFoundError(f"{path}: no weights (*.safetensors or pytorch_model*.bin) in the model folder")
    with open(path / "config.json") as f:
        return json.load(f)


def _compressed_kwargs(cfg: dict[str, Any]) -> dict[str, Any]:
    """Asymmetric weight-only checkpoints load through the dequantizing path: transformers' default path
    sizes their packed zero points wrongly. Without activation quantization both paths compute the same."""
    q = cfg.get("quantization_config") or {}
    if q.get("quant_method") != "compressed-tensors":
        return {}
    groups = (q.get("config_groups") or {}).values()
    if any(not g["weights"]["symmetric"] and g.get("input_activations") is None for g in groups):
        from transformers import CompressedTensorsConfig

        return {"quantization_config": CompressedTensorsConfig(dequantize=True)}
    return {}


def model_source(path: str) -> tuple[str, dict[str, Any]]:
    """The folder and extra from_pretrained arguments for a model path."""
    p = Path(path)
    if not p.exists():
        raise ModelNotFoundError(f"{path}: no such model folder or file")
    if p.is_file():
        if p.suffix != ".gguf":
            raise ModelNotFoundError(f"{path}: expected a model folder or a .gguf file")
        return _gguf_source(p)
    return str(p), _compressed_kwargs(_check_folder(p))


def load_causal_lm(path: str, dtype: torch.dtype = torch.float32) -> tuple[nn.Module, Any]:
    """The model (eval mode) and its tokenizer (None when the folder has none)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, kwargs = model_source(path)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, **kwargs).eval()
    tok_kwargs = {"gguf_file": kwargs["gguf_file"]} if "gguf_file" in kwargs else {}
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, **tok_kwargs)
    except (OSError, ValueError):
        tokenizer = None
    return model, tokenizer
