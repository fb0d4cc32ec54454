"""Rotary position embedding: the cos/sin table, indexed by position, with the scalings of long-context
checkpoints (linear, llama3, dynamic NTK, YaRN) computed as transformers computes them. The fused
attention prologue (kernels/rope_store.py) applies it.

Dynamic NTK grows the rotary base with the sequence length L (once L exceeds max_position_embeddings).
transformers recomputes the frequencies for each forward call from the longest position in it, and keeps
the keys already cached as they were rotated; row p of our table rotates position p with the frequencies
of length p + 1, which is exactly what transformers computes when tokens arrive one at a time (every
decode step, and any prompt within max_position_embeddings, where the base is unchanged).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from slimserve.errors import SlimserveError

SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3", "dynamic", "yarn")


def rope_type_of(scaling: dict[str, Any] | None) -> str:
    return (scaling or {}).get("rope_type", (scaling or {}).get("type", "default"))


def _exponents(head_dim: int) -> torch.Tensor:
    return torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim


def _llama3(inv_freq: torch.Tensor, scaling: dict[str, Any]) -> torch.Tensor:
    factor = float(scaling["factor"])
    low_freq_factor = float(scaling["low_freq_factor"])
    high_freq_factor = float(scaling["high_freq_factor"])
    old_context_len = float(scaling["original_max_position_embeddings"])
    low_freq_wavelen = old_context_len / low_freq_factor
    high_freq_wavelen = old_context_len / high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    # Long wavelengths are slowed down by `factor`, short ones kept, the band between interpolated.
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_context_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = ~(wavelen < high_freq_wavelen) & ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def _yarn(head_dim: int, theta: float, scaling: dict[str, Any], max_position: int) -> tuple[torch.Tensor, float]:
    """YaRN: interpolate the low frequencies by `factor`, keep the high ones, ramp between the dimensions
    that rotate beta_slow and beta_fast times over the original context; scale cos/sin by the
    attention factor."""
    original = scaling["original_max_position_embeddings"]
    factor = scaling.get("factor") or max_position / original
    attention_factor = scaling.get("attention_factor")
    if attention_factor is None:
        mscale, mscale_all_dim = scaling.get("mscale"), scaling.get("mscale_all_dim")
        if mscale and mscale_all_dim:
            attention_factor = _yarn_mscale(factor, mscale) / _yarn_mscale(factor, mscale_all_dim)
        else:
            attention_factor = _yarn_mscale(factor)
    beta_fast = scaling.get("beta_fast") or 32
    beta_slow = scaling.get("beta_slow") or 1

    def correction_dim(rotations: float) -> float:
        return head_dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if scaling.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, head_dim - 1)
    if low == high:
        high += 0.001  # no zero-width ramp
    ramp = ((torch.arange(head_dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    pos_freqs = theta ** (torch.arange(0, head_dim, 2).float() / head_dim)
    extrapolation = 1 - ramp
    inv_freq = (1.0 / (factor * pos_freqs)) * (1 - extrapolation) + (1.0 / pos_freqs) * extrapolation
    return inv_freq, float(attention_factor)


def rope_inverse_frequencies(
    head_dim: int, theta: float, scaling: dict[str, Any] | None, max_position: int = 0
) -> tuple[torch.Tensor, float]:
    """(inverse frequencies, cos/sin scale) of the position-independent rope types, computed exactly as
    transformers does (fp32, int64 exponents)."""
    rope_type = rope_type_of(scaling)
    inv_freq = 1.0 / (theta ** _exponents(head_dim))
    if rope_type == "default":
        return inv_freq, 1.0
    if rope_type == "linear":
        return inv_freq / float(scaling["factor"]), 1.0
    if rope_type == "llama3":
        return _llama3(inv_freq, scaling), 1.0
    if rope_type == "yarn":
        return _yarn(head_dim, theta, scaling, max_position)
    raise SlimserveError(f"unsupported rope scaling {rope_type!r}; supported: {', '.join(SUPPORTED_ROPE_TYPES)}")


def dynamic_ntk_frequencies(
    head_dim: int, theta: float, factor: float, max_position: int, seq_lens: torch.Tensor
) -> torch.Tensor:
    """[len(seq_lens), head_dim // 2] inverse frequencies of dynamic NTK scaling at each sequence length,
    in fp32 tensor arithmetic as transformers computes them during generation."""
    seq_lens = torch.maximum(seq_lens, torch.tensor(max_position, dtype=seq_lens.dtype))
    base = theta * ((factor * seq_lens / max_position) - (factor - 1)) ** (head_dim / (head_dim - 2))
    return 1.0 / (base[:, None] ** _exponents(head_dim)[None, :])


def cos_sin_table(
    head_dim: int, max_position: int, num_positions: int, theta: float, scaling: dict[str, Any] | None
) -> torch.Tensor:
    """[num_positions, head_dim]: cos | sin of each position's rotation angles."""
    positions = torch.arange(num_positions, dtype=torch.float32)
    if rope_type_of(scaling) == "dynamic":
        lengths = torch.arange(1, num_positions + 1, dtype=torch.int64)
        inv_freq = dynamic_ntk_frequencies(head_dim, theta, float(scaling["factor"]), max_position, lengths)
        freqs, scale = positions[:, None] * inv_freq, 1.0
    else:
        inv_freq, scale = rope_inverse_frequencies(head_dim, theta, scaling, max_position)
        freqs = torch.outer(positions, inv_freq)
    return torch.cat((freqs.cos() * scale, freqs.sin() * scale), dim=-1)


class RotaryEmbedding(nn.Module):
    def __init__(
        self,
        head_dim: int,
        max_position: int,
        theta: float,
        scaling: dict[str, Any] | None,
        num_positions: int | None = None,
    ) -> None:
        """`max_position` is the model's max_position_embeddings; the table covers `num_positions` (the
        longest context the scaling supports, by default max_position)."""
        super().__init__()
        table = cos_sin_table(head_dim, max_position, num_positions or max_position, theta, scaling)
        self.register_buffer("cos_sin_cache", table, persistent=False)
