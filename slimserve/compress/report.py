"""What a compression run did, written next to the checkpoint as slimserve_report.json."""

from __future__ import annotations

import resource
import sys
from dataclasses import asdict, dataclass, field
from typing import Any

import torch


@dataclass
class LinearRecord:
    method: str  # the algorithm that produced the weight: rtn, gptq, awq, or rtn after a GPTQ fallback
    weight_error: float  # ||W_q - W|| / ||W|| against the weight as it entered quantization
    output_error: float | None = None  # tr(dW H dW^T) / tr(W H W^T): relative output error on calibration data
    damping: float | None = None


@dataclass
class LayerRecord:
    index: int
    seconds: float
    peak_memory_mb: float
    linears: dict[str, LinearRecord] = field(default_factory=dict)
    balance: dict[str, dict[str, float]] = field(default_factory=dict)  # AWQ/SmoothQuant per balance group


@dataclass
class CompressionReport:
    scheme: dict[str, Any]
    device: str
    calibration: dict[str, Any] | None = None
    layers: list[LayerRecord] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # linear layers left in full precision
    unquantized_weights: list[str] = field(default_factory=list)  # other matrices left as they were
    gptq_fallbacks: list[str] = field(default_factory=list)  # layers whose Hessian was unusable: RTN instead
    uncalibrated_experts: list[str] = field(default_factory=list)  # MoE experts no calibration token reached
    kv_cache_skip_layers: list[int] = field(default_factory=list)  # layers whose KV cache stays in full precision
    # Per layer: the KL divergence its quantized cache alone causes on calibration data (automatic choice only).
    kv_cache_layer_kl: list[float] | None = None
    # Scales distilled on the original model's logits after rounding: steps, seconds, first and last loss.
    scale_tuning: dict[str, Any] | None = None
    seconds: float = 0.0
    peak_memory_mb: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_mb(device: torch.device) -> float:
    """Peak accelerator memory, or the process's peak resident memory on the CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 2**10
