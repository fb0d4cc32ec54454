"""Held-out evaluation text: Jane Austen's Persuasion (public domain), never used for calibration."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from slimserve.errors import SlimserveError

HELDOUT_NAME = "Austen held-out (Persuasion)"


def heldout_text(path: str | None = None) -> tuple[str, str]:
    """The text and its name: the shipped Persuasion, or a user file."""
    if path is None:
        text = resources.files("slimserve.eval.data").joinpath("persuasion.txt").read_text(encoding="utf-8")
        return text, HELDOUT_NAME
    p = Path(path)
    if not p.is_file():
        raise SlimserveError(f"{path}: evaluation text file not found")
    text = p.read_text(encoding="utf-8", errors="replace")
    if not text.strip():
        raise SlimserveError(f"{path}: evaluation text file is empty")
    return text, p.name
