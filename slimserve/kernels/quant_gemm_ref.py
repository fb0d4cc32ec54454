"""Plain-torch reference of the quantized GEMMs (the oracle of quant_gemm.py and the CPU path).

Weights are in one layout whatever checkpoint they came from (`QuantWeight`):
- integer codes, unsigned (q + 2**(bits-1) for signed grids), packed along the input dimension into int32 words,
  code i of a row at bits [i*bits, (i+1)*bits) (the compressed-tensors "pack-quantized" layout), with one scale
  and optionally one zero point (unsigned domain) per (output row, group of `group_size` inputs);
- or FP8 E4M3 values [N, K] with one scale per (block_n rows, group_size inputs) (per-channel: block_n 1,
  group_size K; DeepSeek blocks: 128, 128).
Dequantized weight: (code - zero) * scale; symmetric integer grids have zero 2**(bits-1). The tensors may be
stored output-major (as checkpoints hold them) or input-major (`input_major`, what the decode GEMV reads best):
the kernels take their strides.

Activations are either the model's floats (A16) or FP8 values with a scale per (token, group of
`x_group` inputs) (A8)."""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

FP8_MAX = 448.0


@dataclass
class QuantWeight:
    qweight: torch.Tensor  # int32 [N, ceil(K / (32 // bits))] or float8_e4m3fn [N, K]
    scales: torch.Tensor  # [ceil(N / block_n), ceil(K / group_size)]
    zeros: torch.Tensor | None  # [N, ceil(K / group_size)], unsigned domain; None: symmetric
    bits: int  # 2, 4 or 8 (whole codes per int32 word)
    group_size: int  # inputs per scale (K for one scale per row)
    in_features: int
    out_features: int
    block_n: int = 1  # output rows per scale row
    perm: torch.Tensor | None = None  # act order: the kernel reads x[:, perm] (groups made contiguous)
    counters: torch.Tensor | None = None  # int32 zeros: the decode GEMV's split-K arrival counts (left zero)

    @property
    def is_fp8(self) -> bool:
        return self.qweight.dtype == torch.float8_e4m3fn

    def input_major(self) -> QuantWeight:
        """The same weight with its words, scales and zero points stored input-major (the [N, ...] views of
        [..., N] buffers): a decode GEMV then reads every K step of a tile as one contiguous run along N.
        The logical shapes, and so every function here, do not change."""

        def transposed(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.t().contiguous().t()

        # One counter per (token, column tile): enough for 16 tokens and tiles of 16 columns or more.
        counters = torch.zeros(self.out_features + 16, dtype=torch.int32, device=self.qweight.device)
        return replace(self, qweight=transposed(self.qweight), scales=transposed(self.scales),
                       zeros=transposed(self.zeros), counters=counters)  # fmt: skip


def unpack_codes(qweight: torch.Tensor, bits: int, k: int) -> torch.Tensor:
    """Unsigned codes [N, K] (int32) of a packed int32 [N, ceil(K / (32 // bits))] tensor."""
    per_word = 32 // bits
    shifts = torch.arange(per_word, device=qweight.device, dtype=torch.int32) * bits
    codes = (qweight.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)
    return codes.flatten(1)[:, :k]


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of unpack_codes: unsigned codes [N, K] -> int32 [N, ceil(K / (32 // bits))]."""
    per_word = 32 // bits
    n, k = codes.shape
    padded = torch.nn.functional.pad(codes.to(torch.int64), (0, -k % per_word)).view(n, -1, per_word)
    shifts = torch.arange(per_word, device=codes.device, dtype=torch.int64) * bits
    words = (padded << shifts).sum(-1)  # fields do not overlap: the sum is a bitwise or
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def _expand(t: torch.Tensor, rows: int, cols: int, block_n: int, group_size: int) -> torch.Tensor:
    return t.repeat_interleave(block_n, 0)[:rows].repeat_interleave(group_size, 1)[:, :cols]


def dequantize_ref(w: QuantWeight, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The weight [N, K] in fp32 (then `dtype`), columns in the kernel's (permuted) order."""
    n, k = w.out_features, w.in_features
    scales = _expand(w.scales.float(), n, k, w.block_n, w.group_size)
    if w.is_fp8:
        return (w.qweight.float() * scales).to(dtype)
    codes = unpack_codes(w.qweight, w.bits, k).float()
    if w.zeros is None:
        zeros = torch.full_like(codes, float(1 << (w.bits - 1)))
    else:
        zeros = _expand(w.zeros.float(), n, k, 1, w.group_size)
    return ((codes - zeros) * scales).to(dtype)


def quant_gemm_ref(
    x: torch.Tensor, w: QuantWeight, x_scale: torch.Tensor | None = None, out_dtype: torch.dtype | None = None
) -> torch.Tensor:
    """y [M, N] = x [M, K] @ dequantized(w).T, in fp32 then `out_dtype` (default: x's dtype, bf16 for FP8 x).

    With x_scale [M, G] the activations are FP8 values, each scaled by its token's scale for its group of
    K / G inputs (G = 1: per token). x is already in the kernel's column order (w.perm applied)."""
    out_dtype = out_dtype or (torch.bfloat16 if x_scale is not None else x.dtype)
    xf = x.float()
    if x_scale is not None:
        group = -(-w.in_features // x_scale.shape[1])
        xf = xf * x_scale.float().repeat_interleave(group, 1)[:, : w.in_features]
    return (xf @ dequantize_ref(w).t()).to(out_dtype)


@dataclass
class NormIn:
    """A GEMV input that is an RMSNorm's h * gain before its 1 / rms: the outputs take rsqrt(sumsq / K + eps),
    sumsq [>= M] (fp32) holding each token's sum(h**2)."""

    sumsq: torch.Tensor
    eps: float


@dataclass
class NormOut:
    """A GEMV whose outputs plus `residual` form the new residual stream h [M, N], which prepares the next
    RMSNorm: h * gain (returned beside h) and sum(h**2) added to sumsq [>= M] (fp32)."""

    residual: torch.Tensor
    gain: torch.Tensor
    sumsq: torch.Tensor


def int_gemv_norm_ref(
    x: torch.Tensor,
    w: QuantWeight,
    norm_in: NormIn | None = None,
    norm_out: NormOut | None = None,
    gated: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """y = x @ dequantized(w).T with the halves of RMSNorms around it (NormIn, NormOut): (y, None), or (h, h *
    gain) with NormOut. A norm then costs no kernel of its own: RMSNorm(h) @ W.T = ((h * gain) @ W.T) / rms(h).
    gated: w's outputs are the halves [gate | up] of a gated MLP, and y is silu(gate) * up (in fp32, rounded
    once), so the activation costs no kernel either."""
    m, k = x.shape
    y = quant_gemm_ref(x, w, None, torch.float32)
    if norm_in is not None:
        y = y * torch.rsqrt(norm_in.sumsq[:m, None] / k + norm_in.eps)
    if gated:
        gate, up = y.chunk(2, dim=-1)
        y = torch.nn.functional.silu(gate) * up
    if norm_out is None:
        return y.to(x.dtype), None
    h = (y.to(x.dtype) + norm_out.residual).to(x.dtype)
    norm_out.sumsq[:m] += h.float().square().sum(-1)
    return h, (h.float() * norm_out.gain.float()).to(x.dtype)
