"""Engines that misbehave on purpose, built inside the engine process (so importable by name)."""

from __future__ import annotations

from slimserve.config import SamplingParams
from slimserve.engine.engine import LLMEngine
from slimserve.errors import SamplingParamsError

UNLUCKY_SEED = 13


class FlakyEngine(LLMEngine):
    """Its first two steps raise, as a lost device would."""

    failures_left = 2

    def step(self):
        if self.failures_left:
            self.failures_left -= 1
            raise RuntimeError("device lost")
        return super().step()


class PickyEngine(LLMEngine):
    """Refuses a seed the front end accepts: the engine's own validation, seen from the HTTP side."""

    def add_request(self, request_id: str, prompt, params: SamplingParams, stream: bool = True) -> None:
        if params.seed == UNLUCKY_SEED:
            raise SamplingParamsError(f"seed {UNLUCKY_SEED} is refused")
        super().add_request(request_id, prompt, params, stream)
