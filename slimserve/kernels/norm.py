"""RMSNorm (optionally fused with the residual add before it) in Triton, beside norm_ref.py."""

import torch

from slimserve.kernels.common import pdl_options
from slimserve.kernels.dispatch import HAS_TRITON, use_triton
from slimserve.kernels.norm_ref import rms_norm_ref

if HAS_TRITON:
    import triton
    import triton.language as tl

    from slimserve.kernels.common import wait_for_previous

    @triton.jit
    def _rms_norm_kernel(
        x_ptr,
        res_ptr,
        w_ptr,
        out_ptr,
        res_out_ptr,
        stride_x,
        stride_res,
        stride_out,
        stride_res_out,
        n_cols,
        eps,
        HAS_RESIDUAL: tl.constexpr,
        BLOCK: tl.constexpr,
        USE_PDL: tl.constexpr,
    ):
        row = tl.program_id(0).to(tl.int64)
        offs = tl.arange(0, BLOCK)
        mask = offs < n_cols
        w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        wait_for_previous(USE_PDL)
        # Every value goes through fp32: the CPU interpreter cannot do arithmetic on bf16.
        x = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0).to(tl.float32)
        if HAS_RESIDUAL:
            x = x + tl.load(res_ptr + row * stride_res + offs, mask=mask, other=0.0).to(tl.float32)
            # The reference rounds the sum to x's dtype before normalising it.
            x = x.to(res_out_ptr.dtype.element_ty)
            tl.store(res_out_ptr + row * stride_res_out + offs, x, mask=mask)
            x = x.to(tl.float32)
        inv_rms = tl.rsqrt(tl.sum(x * x, axis=0) / n_cols + eps)
        h = (x * inv_rms).to(x_ptr.dtype.element_ty).to(tl.float32)
        tl.store(out_ptr + row * stride_out + offs, (h * w).to(out_ptr.dtype.element_ty), mask=mask)


def rms_norm_triton(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Same contract as rms_norm_ref; one program per row, the whole row in registers."""
    n_cols = x.shape[-1]
    x2 = x.reshape(-1, n_cols)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    out = torch.empty(x.shape, dtype=torch.result_type(weight, x), device=x.device)
    out2 = out.view(-1, n_cols)
    if residual is None:
        res2 = res_out2 = x2  # unused by the kernel when HAS_RESIDUAL is off
    else:
        res2 = residual.reshape(-1, n_cols)
        if res2.stride(-1) != 1:
            res2 = res2.contiguous()
        new_residual = torch.empty(x.shape, dtype=x.dtype, device=x.device)
        res_out2 = new_residual.view(-1, n_cols)
    block = triton.next_power_of_2(n_cols)
    _rms_norm_kernel[(x2.shape[0],)](
        x2,
        res2,
        weight,
        out2,
        res_out2,
        x2.stride(0),
        res2.stride(0),
        out2.stride(0),
        res_out2.stride(0),
        n_cols,
        eps,
        HAS_RESIDUAL=residual is not None,
        BLOCK=block,
        num_warps=min(max(block // 256, 1), 16),
        **pdl_options(x.device),
    )
    return out if residual is None else (out, new_residual)


def rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    if use_triton(x):
        return rms_norm_triton(x, weight, eps, residual)
    return rms_norm_ref(x, weight, eps, residual)
