"""Speculative decoding inside the engine: a proposer drafts tokens, the target verifies them in one pass."""

from slimserve.engine.speculative.config import SpeculativeConfig

__all__ = ["SpeculativeConfig"]
