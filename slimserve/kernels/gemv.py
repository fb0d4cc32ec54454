"""Decode GEMVs that absorb the small kernel before them, in Triton, beside gemv_ref.py.

At batch 1 a decoder layer is a chain of kernels too small to reach the memory bandwidth; the RMSNorm
(with its residual add) and the gated SiLU each cost a launch and a round trip through memory for a few
kilobytes. Here every program recomputes that prologue for the whole input row (it is tiny and stays in
L2) and streams BLOCK_N rows of the weight, so q|k|v, gate|up and down are one kernel each. A program takes
all input rows (up to MAX_ROWS: a small decode batch, or one sequence's speculative verification) and BLOCK_N
output features, so each weight tile is read once for every row; the block shape is tuned per (N, K, rows) on
the GPU.
"""

import torch

from slimserve.kernels.dispatch import HAS_TRITON, INTERPRETED, use_triton
from slimserve.kernels.gemv_ref import norm_gemv_ref, silu_mul_gemv_ref

if HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _gemv_kernel(
        x_ptr,
        res_ptr,
        res_out_ptr,
        norm_w_ptr,
        w_ptr,
        b_ptr,
        out_ptr,
        M,
        N,
        K,
        stride_x,
        stride_res,
        stride_res_out,
        stride_w,
        stride_out,
        eps,
        NORM: tl.constexpr,
        HAS_RESIDUAL: tl.constexpr,
        HAS_BIAS: tl.constexpr,
        ROWS: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
    ):
        pid_n = tl.program_id(0)
        dtype = x_ptr.dtype.element_ty
        offs_m = tl.arange(0, ROWS)
        mask_m = offs_m < M
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_n = offs_n < N
        offs_k = tl.arange(0, BLOCK_K)
        w_rows = w_ptr + offs_n[:, None].to(tl.int64) * stride_w
        x_rows = x_ptr + offs_m[:, None].to(tl.int64) * stride_x
        acc = tl.zeros([ROWS, BLOCK_N, BLOCK_K], dtype=tl.float32)
        squares = tl.zeros([ROWS, BLOCK_K], dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            cols = k0 + offs_k
            mask_k = cols < K
            mask = mask_m[:, None] & mask_k[None, :]
            if NORM:
                # RMSNorm scales a row by one number: the sum of squares accumulates beside the products and
                # the scale is applied at the end, so the weights stream from the first iteration.
                x = tl.load(x_rows + cols[None, :], mask=mask, other=0.0).to(tl.float32)
                if HAS_RESIDUAL:
                    # The residual sum is rounded to the activation dtype before it is normalised, as in the
                    # reference.
                    res = tl.load(res_ptr + offs_m[:, None] * stride_res + cols[None, :], mask=mask, other=0.0)
                    x = (x + res.to(tl.float32)).to(dtype).to(tl.float32)
                    if pid_n == 0:
                        tl.store(res_out_ptr + offs_m[:, None] * stride_res_out + cols[None, :], x.to(dtype), mask=mask)
                squares += x * x
                a = x * tl.load(norm_w_ptr + cols, mask=mask_k, other=0.0).to(tl.float32)[None, :]
            else:  # the gated SiLU of x = cat(gate, up)
                gate = tl.load(x_rows + cols[None, :], mask=mask, other=0.0).to(tl.float32)
                up = tl.load(x_rows + K + cols[None, :], mask=mask, other=0.0).to(tl.float32)
                # torch rounds silu(gate) to the input dtype before the product; so does this.
                act = (gate / (1.0 + tl.exp(-gate))).to(dtype).to(tl.float32)
                a = (act * up).to(dtype).to(tl.float32)
            # One read of the weight tile serves every row.
            w = tl.load(w_rows + cols[None, :], mask=mask_n[:, None] & mask_k[None, :], other=0.0)
            acc += w.to(tl.float32)[None, :, :] * a[:, None, :]
        y = tl.sum(acc, axis=2)
        if NORM:
            y *= tl.rsqrt(tl.sum(squares, axis=1) / K + eps)[:, None]
        if HAS_BIAS:
            y += tl.load(b_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
        out = out_ptr + offs_m[:, None] * stride_out + offs_n[None, :]
        tl.store(out, y.to(out_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])

    def _tuning_configs() -> list[triton.Config]:
        if INTERPRETED:  # one configuration: the interpreter would time every candidate
            return [triton.Config({"BLOCK_N": 4, "BLOCK_K": 64})]
        # One-row tiles, and smaller ones that keep several rows' accumulators in registers.
        return [
            triton.Config({"BLOCK_N": block_n, "BLOCK_K": block_k}, num_warps=warps, num_stages=stages)
            for block_n, block_k, warps in (
                (2, 512, 4), (4, 1024, 8), (8, 512, 8), (16, 256, 8), (32, 256, 8), (2, 256, 4), (4, 256, 4),
                (8, 128, 4), (16, 64, 4),
            )
            for stages in (1, 3)
        ]  # fmt: skip

    # Tuned once per (N, K, prologue, rows) during the engine's eager warm-up, before CUDA-graph capture.
    _gemv_tuned = triton.autotune(
        _tuning_configs(),
        key=["N", "K", "NORM", "HAS_RESIDUAL", "ROWS"],
        do_bench=lambda call, quantiles: triton.testing.do_bench(call, warmup=5, rep=20, quantiles=quantiles),
    )(_gemv_kernel)

# Rows the kernels take at once (a small decode batch, one sequence's speculative verification).
MAX_ROWS = 16


def _launch(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    *,
    norm_weight: torch.Tensor | None = None,
    eps: float = 0.0,
    residual: torch.Tensor | None = None,
    block: tuple[int, int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Run the kernel on rows of x: with the RMSNorm prologue when there is a norm weight, else with the gated
    SiLU of x = cat(gate, up). `block` = (BLOCK_N, BLOCK_K) bypasses tuning (tests)."""
    n, k = weight.shape
    in_features = x.shape[-1] if norm_weight is not None else x.shape[-1] // 2
    if k != in_features:
        raise ValueError(f"weight has {k} input features, the input {in_features}")
    x2 = x.reshape(-1, x.shape[-1])
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    if weight.stride(-1) != 1:
        weight = weight.contiguous()
    rows = x2.shape[0]
    out = torch.empty((rows, n), dtype=x.dtype, device=x.device)
    res2 = new_res2 = x2  # unused unless there is a residual
    new_residual = None
    if residual is not None:
        res2 = residual.reshape(-1, k)
        if res2.stride(-1) != 1:
            res2 = res2.contiguous()
        new_residual = torch.empty(x.shape, dtype=x.dtype, device=x.device)
        new_res2 = new_residual.view(-1, k)
    if rows > MAX_ROWS:
        raise ValueError(f"the fused GEMVs take at most {MAX_ROWS} rows, got {rows}")
    args = (
        x2,
        res2,
        new_res2,
        norm_weight if norm_weight is not None else weight,
        weight,
        bias if bias is not None else weight,
        out,
        rows,
        n,
        k,
        x2.stride(0),
        res2.stride(0),
        new_res2.stride(0),
        weight.stride(0),
        out.stride(0),
        eps,
    )
    flags = dict(
        NORM=norm_weight is not None,
        HAS_RESIDUAL=residual is not None,
        HAS_BIAS=bias is not None,
        ROWS=triton.next_power_of_2(rows),
    )
    if block is None:
        _gemv_tuned[lambda meta: (triton.cdiv(n, meta["BLOCK_N"]),)](*args, **flags)
    else:
        _gemv_kernel[(triton.cdiv(n, block[0]),)](*args, **flags, BLOCK_N=block[0], BLOCK_K=block[1])
    return out.view(*x.shape[:-1], n), new_residual


def norm_gemv_triton(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    norm_weight: torch.Tensor,
    eps: float,
    residual: torch.Tensor | None = None,
    block: tuple[int, int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Same contract as norm_gemv_ref, with the norm weight in the activations' dtype."""
    out, new_residual = _launch(
        x,
        weight,
        bias,
        norm_weight=norm_weight,
        eps=eps,
        residual=residual,
        block=block,
    )
    return out, x if new_residual is None else new_residual


def silu_mul_gemv_triton(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    block: tuple[int, int] | None = None,
) -> torch.Tensor:
    """Same contract as silu_mul_gemv_ref."""
    return _launch(x, weight, bias, block=block)[0]


def norm_gemv(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    norm_weight: torch.Tensor,
    eps: float,
    residual: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    if use_triton(x):
        return norm_gemv_triton(x, weight, bias, norm_weight, eps, residual)
    return norm_gemv_ref(x, weight, bias, norm_weight, eps, residual)


def silu_mul_gemv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    if use_triton(x):
        return silu_mul_gemv_triton(x, weight, bias)
    return silu_mul_gemv_ref(x, weight, bias)
