"""Speculative decoding options, named as vLLM names them (`speculative_config`)."""

from __future__ import annotations

import json
from dataclasses import dataclass, fields
from typing import Any

from slimserve.errors import SlimserveError

METHODS = ("draft", "ngram", "eagle")


@dataclass
class SpeculativeConfig:
    """method: "draft" (a smaller model sharing the tokenizer), "ngram" (prompt lookup) or "eagle" (a draft
    head trained by `slimserve train-draft`). model: the draft model or head folder. Speculation is off for
    a step when more than disable_by_batch_size sequences run: large batches are compute-bound already."""

    method: str
    num_speculative_tokens: int = 4
    model: str | None = None
    disable_by_batch_size: int = 16
    prompt_lookup_min: int = 2
    prompt_lookup_max: int = 4

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise SlimserveError(f"speculative method {self.method!r} is unknown; choose one of {', '.join(METHODS)}")
        if self.num_speculative_tokens < 1:
            raise SlimserveError(f"num_speculative_tokens must be positive, got {self.num_speculative_tokens}")
        if self.method in ("draft", "eagle") and not self.model:
            raise SlimserveError(f"speculative method {self.method!r} needs a 'model'")
        if self.disable_by_batch_size < 1:
            raise SlimserveError(f"disable_by_batch_size must be positive, got {self.disable_by_batch_size}")
        if not 1 <= self.prompt_lookup_min <= self.prompt_lookup_max:
            raise SlimserveError("prompt lookup needs 1 <= prompt_lookup_min <= prompt_lookup_max")

    @classmethod
    def parse(cls, value: SpeculativeConfig | dict[str, Any] | str | None) -> SpeculativeConfig | None:
        """A config, a dict, or a JSON string (the CLI's --speculative-config); None or {} means off."""
        if value is None or isinstance(value, SpeculativeConfig):
            return value
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except json.JSONDecodeError as e:
                raise SlimserveError(f"speculative config is not valid JSON: {e}") from e
        if not isinstance(value, dict):
            raise SlimserveError("speculative config must be a JSON object")
        if not value:
            return None
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(value) - known)
        if unknown:
            raise SlimserveError(f"unknown speculative config keys: {', '.join(unknown)}")
        if "method" not in value:
            raise SlimserveError("speculative config needs a 'method' (draft, ngram or eagle)")
        return cls(**value)
