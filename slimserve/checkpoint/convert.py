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

from slimserve.checkpoint.gguf_reader import GGUFCheckpoint, TensorInfo, open_gguf
from slimserve.checkpoint.gguf_tokenizer import build_tokenizer
from slimserve.errors import SlimserveError

_DTYPES = {
    "auto": torch.float32,
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}
MAX_SHARD_BYTES = 2 * 1024**3


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
        target = _DTYPES[dtype]
        _write_weights(ckpt, tmp, target, max_shard_bytes, progress)
        config = {**ckpt.config, "torch_dtype": str(target).removeprefix("torch.")}
        _write_json(tmp / "config.json", config)
        _write_json(tmp / "generation_config.json", ckpt.generation_config)
        tokenizer.save_pretrained(str(tmp))
        # rename(2) replaces an empty folder and fails on a non-empty one: nothing is ever overwritten.
        os.rename(tmp, out)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise SlimserveError(f"{out}: could not write the converted model ({e})") from e
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return str(out)


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n")


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
