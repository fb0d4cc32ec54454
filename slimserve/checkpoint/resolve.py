"""A model argument (nothing, a short name, a .gguf file or a folder) turned into a local Hugging Face folder."""

from __future__ import annotations

import hashlib
from pathlib import Path

from slimserve.checkpoint.convert import FORMAT_VERSION, convert_gguf
from slimserve.checkpoint.default_model import DEFAULT_MODEL, REAL_MODELS, cache_dir, fetch_real_model
from slimserve.checkpoint.gguf_reader import GGUF_MAGIC
from slimserve.errors import ModelNotFoundError, SlimserveError


def resolve_model(model: str | None = None) -> str:
    """Path of a local Hugging Face folder for `model`, converting a GGUF into the cache the first time.

    `None` or "default" is the embedded default model; a registered short name (e.g. "smollm2-135m") is
    downloaded once; a .gguf file is converted once (keyed by its path, size and modification time).
    """
    name = DEFAULT_MODEL if model in (None, "default") else str(model)
    if name in REAL_MODELS:
        folder = _cache_folder(name, REAL_MODELS[name].sha256)
        return str(folder) if _is_model_folder(folder) else _convert_once(Path(fetch_real_model(name)), folder)
    path = Path(name).expanduser()
    if path.is_dir():
        _check_model_folder(path)
        return str(path)
    if path.is_file():
        if not _is_gguf(path):
            raise ModelNotFoundError(f"{path}: neither a Hugging Face model folder nor a GGUF file")
        stat = path.stat()
        key = hashlib.sha256(f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()
        folder = _cache_folder(path.stem, key)
        return str(folder) if _is_model_folder(folder) else _convert_once(path, folder)
    raise ModelNotFoundError(
        f"{name!r} not found; no model hub is reachable; pass a local folder or .gguf file "
        f"(or one of: default, {', '.join(REAL_MODELS)})"
    )


def _cache_folder(stem: str, key: str) -> Path:
    return cache_dir() / "models" / f"{stem}-{key[:16]}-v{FORMAT_VERSION}"


def _convert_once(gguf: Path, folder: Path) -> str:
    try:
        return convert_gguf(str(gguf), str(folder))
    except SlimserveError:
        # Another process may have finished the same conversion first.
        if _is_model_folder(folder):
            return str(folder)
        raise


def _is_gguf(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(len(GGUF_MAGIC)) == GGUF_MAGIC


def _missing(folder: Path) -> list[str]:
    missing = [] if (folder / "config.json").is_file() else ["config.json"]
    return missing + ([] if any(folder.glob("*.safetensors")) else ["*.safetensors weights"])


def _is_model_folder(folder: Path) -> bool:
    return folder.is_dir() and not _missing(folder)


def _check_model_folder(folder: Path) -> None:
    missing = _missing(folder)
    if missing:
        raise ModelNotFoundError(f"{folder}: not a Hugging Face model folder (no {' and no '.join(missing)})")
