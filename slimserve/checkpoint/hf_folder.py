"""Read a Hugging Face model folder: safetensors weights (single file or sharded with an index)."""

import json
import os
from collections.abc import Iterator

import torch
from safetensors import SafetensorError, safe_open

from slimserve.errors import CheckpointError, ModelNotFoundError


def safetensors_files(folder: str) -> list[str]:
    """The weight files of a folder, in index order when sharded."""
    if not os.path.isdir(folder):
        raise ModelNotFoundError(f"{folder}: no such model folder")
    index_path = os.path.join(folder, "model.safetensors.index.json")
    if os.path.isfile(index_path):
        with open(index_path) as f:
            weight_map = json.load(f).get("weight_map", {})
        files = list(dict.fromkeys(weight_map.values()))
    else:
        files = sorted(f for f in os.listdir(folder) if f.endswith(".safetensors"))
    if not files:
        raise ModelNotFoundError(f"{folder}: no *.safetensors weights")
    paths = [os.path.join(folder, f) for f in files]
    for path in paths:
        if not os.path.isfile(path):
            raise ModelNotFoundError(f"{path}: listed in the index but missing")
    return paths


def _casts(name: str, tensor: torch.Tensor) -> bool:
    """Weights take the model's dtype; FP8 values and quantization scales stay as stored (the quantized
    layers decide their precision)."""
    if not tensor.is_floating_point() or tensor.element_size() == 1:
        return False
    return not name.endswith(("_scale", "_scale_inv", ".scales"))


def iter_safetensors(folder: str, device: torch.device, dtype: torch.dtype) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (name, tensor) one at a time, read straight onto `device` (no host copy of the model on CUDA)
    and cast to `dtype` if it is a full-precision weight."""
    for path in safetensors_files(folder):
        try:
            with safe_open(path, framework="pt", device=str(device)) as f:
                for name in f.keys():
                    tensor = f.get_tensor(name)
                    yield name, tensor.to(dtype) if _casts(name, tensor) else tensor
        except SafetensorError as e:
            raise CheckpointError(f"{path}: corrupt safetensors file ({e})") from e
