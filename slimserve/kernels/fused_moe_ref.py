"""Plain-torch reference of the fused mixture-of-experts MLP: each token's top-k experts, SiLU-gated,
weighted by the router and summed (an expert loop, as transformers' eager experts do it).

Expert weights are the model's floats, or FP8 E4M3 with one fp32 scale per expert and output channel
(`Fp8ExpertScales`); the experts' inputs then stay in the model's floats (weight-only) or are rounded to FP8
first, per token (dynamic) or with one calibrated scale per expert (static), as compressed-tensors' W8A8
schemes quantize each expert's linear layers."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from slimserve.kernels.fp8_quant_ref import quantize_fp8_ref

ACT_SCHEMES = (None, "dynamic", "static")


@dataclass
class Fp8ExpertScales:
    """Scales of FP8 expert banks w13 [E, 2I, H] and w2 [E, H, I] (a per-tensor scale is repeated over its
    rows), and how the inputs of each bank are quantized."""

    w13_scale: torch.Tensor  # [E, 2I] fp32
    w2_scale: torch.Tensor  # [E, H] fp32
    act: str | None = None  # None: weight-only; "dynamic": per token; "static": a13_scale / a2_scale
    a13_scale: torch.Tensor | None = None  # [E] fp32: static input scale of each expert's gate|up
    a2_scale: torch.Tensor | None = None  # [E] fp32: static input scale of each expert's down

    def __post_init__(self) -> None:
        if self.act not in ACT_SCHEMES:
            raise ValueError(f"FP8 expert activations must be one of {ACT_SCHEMES}, not {self.act!r}")
        if (self.act == "static") != (self.a13_scale is not None and self.a2_scale is not None):
            raise ValueError("static FP8 expert activations need a13_scale and a2_scale (and only they do)")

    def input_scale(self, bank: str) -> torch.Tensor | None:
        return self.a13_scale if bank == "w13" else self.a2_scale


def _expert_linear(a: torch.Tensor, w: torch.Tensor, e: int, bank: str, scales: Fp8ExpertScales | None) -> torch.Tensor:
    """a @ w[e]^T in fp32 (the model's dtype without scales)."""
    if scales is None:
        return F.linear(a, w[e])
    af = a.float()
    if scales.act == "dynamic":
        q, s = quantize_fp8_ref(a)
        af = q.float() * s
    elif scales.act == "static":
        s = scales.input_scale(bank)[e].reshape(1)
        af = quantize_fp8_ref(a, static_scale=s)[0].float() * s.float()
    w_scale = (scales.w13_scale if bank == "w13" else scales.w2_scale)[e]
    return af @ (w[e].float() * w_scale.float()[:, None]).t()


def fused_moe_ref(
    x: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    expert_start: int = 0,
    scales: Fp8ExpertScales | None = None,
) -> torch.Tensor:
    """x [T, H]; w13 [E, 2I, H] (gate rows, then up rows) and w2 [E, H, I] hold experts
    expert_start .. expert_start + E - 1; topk_weights / topk_ids [T, k] name global experts.
    Returns [T, H]: the sum over each token's experts held here (others contribute nothing).
    With `scales`, w13 and w2 are FP8 and the gated intermediate is rounded to x's dtype between the two."""
    out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    local = topk_ids.long() - expert_start
    for e in torch.unique(local).tolist():  # only the experts some token chose
        if not 0 <= e < w13.shape[0]:
            continue
        token, slot = torch.where(local == e)
        gate, up = _expert_linear(x[token], w13, e, "w13", scales).chunk(2, dim=-1)
        act = (F.silu(gate) * up).to(x.dtype)
        y = _expert_linear(act, w2, e, "w2", scales)
        out.index_add_(0, token, y.float() * topk_weights[token, slot, None].float())
    return out.to(x.dtype)
