"""Model size as a checkpoint stores it, with floating-point tensors counted at 16 bits (the dtype a GPU
checkpoint uses), so the reference and every scheme are measured alike whatever dtype they ran in."""

from __future__ import annotations

from pathlib import Path

from safetensors import safe_open
from torch import nn

_FLOATS = ("F64", "F32", "F16", "BF16")
_BYTES = {"F8_E4M3": 1, "F8_E5M2": 1, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, **dict.fromkeys(_FLOATS, 2)}


def folder_bytes(folder: str | Path) -> int:
    total = 0
    for f in sorted(Path(folder).glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as sf:
            for name in sf.keys():
                sl = sf.get_slice(name)
                total += _BYTES.get(sl.get_dtype(), 4) * max(1, _numel(sl.get_shape()))
    return total


def _numel(shape: list[int]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def module_bytes(model: nn.Module) -> int:
    """Bytes of every distinct parameter and buffer, floats at 16 bits."""
    seen: set[int] = set()
    total = 0
    for t in [*model.parameters(), *model.buffers()]:
        if t.data_ptr() in seen:
            continue
        seen.add(t.data_ptr())
        total += t.numel() * (2 if t.is_floating_point() and t.element_size() >= 2 else t.element_size())
    return total


def model_bytes(path: str, model: nn.Module) -> int:
    """A compressed folder's stored size, or the in-memory size of a model read from elsewhere (GGUF)."""
    p = Path(path)
    if p.is_dir() and any(p.glob("*.safetensors")):
        return folder_bytes(p)
    return module_bytes(model)
