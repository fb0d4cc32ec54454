"""Write a quantized model as a Hugging Face folder in the compressed-tensors format, atomically: everything
goes to a hidden sibling folder that is renamed to the output path only once complete."""

from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from slimserve.compress.configs import QuantConfig
from slimserve.compress.errors import OutputExistsError, QuantConfigError
from slimserve.compress.modules import QuantizedLinear
from slimserve.compress.moe import checkpoint_name
from slimserve.compress.report import CompressionReport

SHARD_BYTES = 4 << 30


def check_output(out: str | os.PathLike) -> Path:
    """Refuse an existing output path before any work is done."""
    path = Path(out)
    if path.exists():
        raise OutputExistsError(f"{path}: output folder already exists; choose a new path")
    if not path.parent.exists():
        raise OutputExistsError(f"{path.parent}: parent folder of the output does not exist")
    return path


def quantization_config(
    model: nn.Module, config: QuantConfig | None, sparsity: dict | None = None, kv_skip_layers: list[int] | None = None
) -> dict[str, Any]:
    """The `quantization_config` entry of config.json (with a `sparsity_config` for pruned weights, and the
    layers whose KV cache the engine keeps in full precision under a key only slimserve reads)."""
    if config is None:
        return {
            "quant_method": "compressed-tensors",
            "format": "dense",
            "quantization_status": "compressed",
            "config_groups": {},
            "ignore": [],
            "sparsity_config": sparsity,
        }
    model_type = getattr(model.config, "model_type", "")
    ignore = sorted(checkpoint_name(model_type, n) for n, m in model.named_modules() if isinstance(m, nn.Linear))
    a = config.input_args()
    group = {
        "targets": ["Linear"],
        "weights": config.weight_args().to_dict(),
        "input_activations": None if a is None else a.to_dict(),
        "output_activations": None,
        "format": config.format,
    }
    out = {
        "quant_method": "compressed-tensors",
        "format": config.format,
        "quantization_status": "compressed",
        "config_groups": {"group_0": group},
        "ignore": ignore,
        "kv_cache_scheme": None if config.kv_cache is None else config.kv_cache.args().to_dict(),
        "global_compression_ratio": None,
        "sparsity_config": sparsity,
    }
    if kv_skip_layers:
        out["kv_cache_skip_layers"] = list(kv_skip_layers)
    return out


def _kv_skip_layers(config: QuantConfig | None, report: CompressionReport | None) -> list[int]:
    """The full-precision KV layers: as quantize_ decided them (its report), else as the config names them."""
    if config is None or config.kv_cache is None:
        return []
    if report is not None:
        return report.kv_cache_skip_layers
    if config.kv_cache.auto_skip:
        raise QuantConfigError("pass quantize_'s report: it holds the automatic choice of full-precision KV layers")
    return list(config.kv_cache.skip_layers)


def _state_dict(model: nn.Module, tied: bool) -> dict[str, torch.Tensor]:
    """Every tensor once; a tied output embedding is dropped as `save_pretrained` drops it."""
    out: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    model_type = getattr(model.config, "model_type", "")
    for name, t in model.state_dict().items():
        if tied and t.data_ptr() in seen and t.is_floating_point():
            continue
        seen.add(t.data_ptr())
        out[checkpoint_name(model_type, name)] = t.detach().to("cpu").contiguous()
    return out


def _save_shards(tensors: dict[str, torch.Tensor], folder: Path) -> None:
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > SHARD_BYTES:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nbytes
    if len(shards) == 1:
        save_file(shards[0], folder / "model.safetensors", metadata={"format": "pt"})
        return
    index: dict[str, str] = {}
    for i, shard in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, folder / fname, metadata={"format": "pt"})
        index.update(dict.fromkeys(shard, fname))
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    with open(folder / "model.safetensors.index.json", "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": index}, f, indent=2)


def save_compressed(
    model: nn.Module,
    config: QuantConfig | None,
    out: str | os.PathLike,
    tokenizer: Any = None,
    report: CompressionReport | None = None,
    sparsity: dict | None = None,
) -> Path:
    """Write the checkpoint; `config` None means weights left in floating point (pruned only)."""
    path = check_output(out)
    tmp = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        cfg = model.config.to_dict()
        cfg.pop("quantization_config", None)  # e.g. the GGUF origin of a dequantized model
        if not cfg.get("architectures"):  # a model built from a config has none until save_pretrained
            cfg["architectures"] = [type(model).__name__]
        tied = bool(cfg.get("tie_word_embeddings", False))
        if tied and isinstance(model.get_output_embeddings(), QuantizedLinear):
            cfg["tie_word_embeddings"] = tied = False  # a quantized lm_head no longer shares the embedding
        cfg["quantization_config"] = quantization_config(model, config, sparsity, _kv_skip_layers(config, report))
        _save_shards(_state_dict(model, tied), tmp)
        with open(tmp / "config.json", "w") as f:
            json.dump(cfg, f, indent=2, sort_keys=True)
        generation = getattr(model, "generation_config", None)
        if generation is not None:
            generation.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if report is not None:
            with open(tmp / "slimserve_report.json", "w") as f:
                json.dump(report.to_dict(), f, indent=2)
        if path.exists():  # created while we were writing: never replace it
            raise OutputExistsError(f"{path}: output folder appeared while writing; the checkpoint was not saved")
        os.rename(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path
