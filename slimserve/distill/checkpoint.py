"""Resumable training state: the student's weights, the optimizer, the step and the loss history, written
atomically as out/checkpoints/step-N (a half-written checkpoint never exists under its final name)."""

from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from slimserve.distill.config import DistillError

STATE_FILE = "trainer_state.json"


def latest_checkpoint(out: Path) -> Path | None:
    folder = out / "checkpoints"
    steps = [(int(p.name.split("-")[1]), p) for p in folder.glob("step-*") if (p / STATE_FILE).is_file()]
    return max(steps)[1] if steps else None


def save_checkpoint(out: Path, student: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> Path:
    folder = out / "checkpoints"
    folder.mkdir(parents=True, exist_ok=True)
    final = folder / f"step-{state['step']}"
    tmp = folder / f".step-{state['step']}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        weights = {n: p.detach().cpu().contiguous() for n, p in student.named_parameters()}
        save_file(weights, tmp / "student.safetensors")
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        with open(tmp / STATE_FILE, "w") as f:
            json.dump(state, f, indent=2)
        shutil.rmtree(final, ignore_errors=True)
        os.rename(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for old in folder.glob("step-*"):  # keep the newest only: a checkpoint is a full copy of the student
        if old != final:
            shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(path: Path, student: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    device = next(student.parameters()).device
    weights = load_file(path / "student.safetensors", device=str(device))
    params = dict(student.named_parameters())
    if set(weights) != set(params):
        raise DistillError(f"{path}: checkpoint does not match the student's parameters")
    with torch.no_grad():
        for name, t in weights.items():
            params[name].copy_(t)
    optimizer.load_state_dict(torch.load(path / "optimizer.pt", map_location=device, weights_only=True))
    with open(path / STATE_FILE) as f:
        return json.load(f)
