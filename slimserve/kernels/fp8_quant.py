"""FP8 activation quantization in one Triton pass (beside fp8_quant_ref.py): each program reads one
(token, group) once, takes its absmax and writes the FP8 values and the scale, instead of the four
launches (abs, amax, divide, cast) of the plain-torch version."""

from __future__ import annotations

import torch

from slimserve.kernels.dispatch import HAS_TRITON, INTERPRETED, use_triton
from slimserve.kernels.fp8_quant_ref import FP8_MAX, MIN_SCALE, quantize_fp8_ref

if HAS_TRITON:
    import triton
    import triton.language as tl

    # Compiled kernels may read only constexpr globals (the interpreter reads any).
    _FP8_MAX = tl.constexpr(FP8_MAX)
    _MIN_SCALE = tl.constexpr(MIN_SCALE)

    @triton.jit
    def round_e4m3(v, ON_GRID: tl.constexpr):
        """v (fp32, within +-448) ready for the cast to E4M3. Triton's CPU interpreter truncates when rounding
        carries into the exponent (124.3 -> 64), so there (ON_GRID) v is first rounded onto the E4M3 grid in
        fp32 and the cast is exact; a GPU's cast rounds correctly by itself."""
        if ON_GRID:
            e = tl.maximum(tl.floor(tl.log2(tl.maximum(tl.abs(v), 1e-30))), -6.0)
            step = tl.exp2(e - 3.0)
            v = tl.floor(v / step + 0.5) * step
        return v

    @triton.jit
    def _quantize_fp8_kernel(
        x_ptr,
        q_ptr,
        scale_ptr,
        static_ptr,
        K,
        stride_xm,
        stride_qm,
        num_groups,
        GROUP: tl.constexpr,
        BLOCK: tl.constexpr,
        STATIC: tl.constexpr,
        ON_GRID: tl.constexpr,
    ):
        row = tl.program_id(0).to(tl.int64)
        g = tl.program_id(1)
        offs = g * GROUP + tl.arange(0, BLOCK)
        mask = (tl.arange(0, BLOCK) < GROUP) & (offs < K)
        x = tl.load(x_ptr + row * stride_xm + offs, mask=mask, other=0.0).to(tl.float32)
        if STATIC:
            scale = tl.load(static_ptr).to(tl.float32)
        else:
            scale = tl.maximum(tl.max(tl.abs(x), axis=0) / _FP8_MAX, _MIN_SCALE)
        q = round_e4m3(tl.minimum(tl.maximum(x / scale, -_FP8_MAX), _FP8_MAX), ON_GRID)
        tl.store(q_ptr + row * stride_qm + offs, q.to(q_ptr.dtype.element_ty), mask=mask)
        tl.store(scale_ptr + row * num_groups + g, scale)


def quantize_fp8_triton(
    x: torch.Tensor, group_size: int | None = None, static_scale: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    m, k = x.shape
    assert x.stride(-1) == 1
    group = k if static_scale is not None or group_size is None else group_size
    num_groups = triton.cdiv(k, group)
    q = torch.empty((m, k), dtype=torch.float8_e4m3fn, device=x.device)
    scale = torch.empty((m, num_groups), dtype=torch.float32, device=x.device)
    if m == 0:
        return q, scale
    block = triton.next_power_of_2(group)
    _quantize_fp8_kernel[(m, num_groups)](
        x, q, scale, scale if static_scale is None else static_scale, k, x.stride(0), q.stride(0), num_groups,
        GROUP=group, BLOCK=block, STATIC=static_scale is not None, ON_GRID=INTERPRETED,
        num_warps=max(1, min(16, block // 256)),
    )  # fmt: skip
    return q, scale


def quantize_fp8(
    x: torch.Tensor, group_size: int | None = None, static_scale: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """quantize_fp8_ref's contract."""
    fn = quantize_fp8_triton if use_triton(x) else quantize_fp8_ref
    return fn(x, group_size, static_scale)
