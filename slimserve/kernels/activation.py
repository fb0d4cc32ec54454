"""Gated SiLU (silu(gate) * up) in Triton, beside activation_ref.py."""

import torch

from slimserve.kernels.activation_ref import silu_and_mul_ref
from slimserve.kernels.common import pdl_options
from slimserve.kernels.dispatch import HAS_TRITON, use_triton

if HAS_TRITON:
    import triton
    import triton.language as tl

    from slimserve.kernels.common import wait_for_previous

    @triton.jit
    def _silu_and_mul_kernel(x_ptr, out_ptr, stride_x, stride_out, n_cols, BLOCK: tl.constexpr,
                             USE_PDL: tl.constexpr):  # fmt: skip
        row = tl.program_id(0).to(tl.int64)
        offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n_cols
        wait_for_previous(USE_PDL)
        gate = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0).to(tl.float32)
        up = tl.load(x_ptr + row * stride_x + n_cols + offs, mask=mask, other=0.0).to(tl.float32)
        # torch rounds silu(gate) to the input dtype before the product; do the same.
        act = (gate / (1.0 + tl.exp(-gate))).to(out_ptr.dtype.element_ty).to(tl.float32)
        tl.store(out_ptr + row * stride_out + offs, (act * up).to(out_ptr.dtype.element_ty), mask=mask)


def silu_and_mul_triton(x: torch.Tensor) -> torch.Tensor:
    """x [..., 2I] -> [..., I]; one program per (row, BLOCK columns)."""
    n_cols = x.shape[-1] // 2
    x2 = x.reshape(-1, 2 * n_cols)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    out = torch.empty((*x.shape[:-1], n_cols), dtype=x.dtype, device=x.device)
    out2 = out.view(-1, n_cols)
    block = min(triton.next_power_of_2(n_cols), 1024)
    grid = (x2.shape[0], triton.cdiv(n_cols, block))
    _silu_and_mul_kernel[grid](
        x2, out2, x2.stride(0), out2.stride(0), n_cols, BLOCK=block, num_warps=4, **pdl_options(x.device)
    )
    return out


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    if use_triton(x):
        return silu_and_mul_triton(x)
    return silu_and_mul_ref(x)
