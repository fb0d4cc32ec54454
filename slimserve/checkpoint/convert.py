"""GGUF file -> Hugging Face model folder (config, generation config, tokenizer, safetensors shards)."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerFast

from slimserve.checkpoint.gguf_reader import GGUFCheckpoint, TensorInfo, open_gguf
from slimserve.checkpoint.gguf_tokenizer import build_tokenizer
from slimserve.errors import SlimserveError

_DTYPES = {
    "auto": torch.float32,
    "float32": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}
MAX_SHARD_BYTES = 2 * 1024**3
# Part of the cache keys of converted folders: bump it when the folders written here change.
FORMAT_VERSION = 1


def convert_gguf(
    gguf_path: str,
    out_dir: str,
    dtype: str = "auto",
    *,
    max_shard_bytes: int = MAX_SHARD_BYTES,
    progress: bool = True,
) -> str:
    """Write the GGUF model as a Hugging Face folder at `out_dir` and return its path.

    `dtype="auto"` keeps the dequantized weights in float32, so the folder equals what transformers computes when
    it loads the GGUF itself. The folder appears whole or not at all: it is written next to `out_dir` and renamed.
    """
    if dtype not in _DTYPES:
        raise SlimserveError(f"unknown dtype {dtype!r} for conversion; choose one of {', '.join(_DTYPES)}")
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise SlimserveError(f"{out}: already exists and is not an empty folder; refusing to overwrite it")
    ckpt = open_gguf(gguf_path)
    tokenizer = build_tokenizer(ckpt)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent))
    try:
        _make_shareable(tmp)
        target = _DTYPES[dtype]
        _write_weights(ckpt, tmp, target, max_shard_bytes, progress)
        config = {**ckpt.config, "dtype": str(target).removeprefix("torch.")}
        _write_json(tmp / "config.json", config)
        _write_json(tmp / "generation_config.json", ckpt.generation_config)
        _write_tokenizer(tokenizer, tmp)
        for path in tmp.iterdir():
            _make_shareable(path)
        # rename(2) replaces an empty folder and fails on a non-empty one: nothing is ever overwritten.
        os.rename(tmp, out)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise SlimserveError(f"{out}: could not write the converted model ({e})") from e
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return str(out)


def _make_shareable(path: Path) -> None:
    """The permissions of an ordinary file or folder (mkdtemp and the safetensors writer make them private)."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~umask)


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n")


def _write_tokenizer(tokenizer: PreTrainedTokenizerFast, folder: Path) -> None:
    """tokenizer.json plus the plain tokenizer_config.json / special_tokens_map.json every transformers reads."""
    tokenizer.backend_tokenizer.save(str(folder / "tokenizer.json"))
    names = ("bos_token", "eos_token", "unk_token", "pad_token")
    specials = {name: getattr(tokenizer, name) for name in names if getattr(tokenizer, name) is not None}
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **specials,
        "add_bos_token": bool(tokenizer.init_kwargs.get("add_bos_token")),
        "add_eos_token": bool(tokenizer.init_kwargs.get("add_eos_token")),
        "clean_up_tokenization_spaces": False,
        "model_max_length": tokenizer.model_max_length,
    }
    if tokenizer.chat_template:
        config["chat_template"] = tokenizer.chat_template
    _write_json(folder / "tokenizer_config.json", config)
    _write_json(folder / "special_tokens_map.json", specials)


def _shards(tensors: list[TensorInfo], itemsize: int, max_bytes: int) -> list[list[TensorInfo]]:
    """Consecutive groups of tensors of at most `max_bytes` each (a larger tensor gets a shard of its own)."""
    shards: list[list[TensorInfo]] = [[]]
    size = 0
    for info in tensors:
        nbytes = itemsize * torch.Size(info.shape).numel()
        if shards[-1] and size + nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(info)
        size += nbytes
    return shards


def _write_weights(ckpt: GGUFCheckpoint, folder: Path, dtype: torch.dtype, max_bytes: int, progress: bool) -> None:
    itemsize = torch.empty((), dtype=dtype).element_size()
    shards = _shards(ckpt.tensors, itemsize, max_bytes)
    names = (
        ["model.safetensors"]
        if len(shards) == 1
        else [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    )
    weight_map = {}
    name = os.path.basename(ckpt.path)
    with tqdm(total=len(ckpt.tensors), desc=f"converting {name}", unit="tensor", disable=not progress) as bar:
        for shard, filename in zip(shards, names):
            tensors = {}
            for info in shard:
                tensors[info.hf_name] = ckpt.read_tensor(info).to(dtype)
                weight_map[info.hf_name] = filename
                bar.update()
            save_file(tensors, str(folder / filename), metadata={"format": "pt"})
    if len(shards) > 1:
        total = sum(itemsize * torch.Size(info.shape).numel() for info in ckpt.tensors)
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        _write_json(folder / "model.safetensors.index.json", index)
