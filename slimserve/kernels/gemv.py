"""Decode GEMVs that absorb the small kernel before them, in Triton, beside gemv_ref.py.

At batch 1 a decoder layer is a chain of kernels too small to reach the memory bandwidth; the RMSNorm
(with its residual add) and the gated SiLU each cost a launch and a round trip through memory for a few
kilobytes. Here every program recomputes that prologue for the whole input row (it is tiny and stays in
L2) and streams BLOCK_N rows of the weight, so q|k|v, gate|up and down are one kernel each (the output
projection takes the same kernel without a prologue). One program per (input row, BLOCK_N output features);
the block shape is tuned per (N, K) on the GPU. Under programmatic dependent launch (Hopper) each kernel
starts loading its weights while the kernel before it drains.
"""

import torch

from slimserve.kernels.common import pdl_options
from slimserve.kernels.dispatch import HAS_TRITON, INTERPRETED, use_triton
from slimserve.kernels.gemv_ref import gemv_ref, norm_gemv_ref, silu_mul_gemv_ref

if HAS_TRITON:
    import triton
    import triton.language as tl

    from slimserve.kernels.common import wait_for_previous

    @triton.jit
    def _load_input(x_ptr, res_ptr, cols, mask, HAS_RESIDUAL: tl.constexpr):
        # The residual sum is rounded to the activation dtype before it is normalised, as in the reference.
        x = tl.load(x_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        if HAS_RESIDUAL:
            x = x + tl.load(res_ptr + cols, mask=mask, other=0.0).to(tl.float32)
            x = x.to(x_ptr.dtype.element_ty).to(tl.float32)
        return x

    @triton.jit
    def _gemv_input(x_ptr, res_ptr, res_out_ptr, norm_w_ptr, cols, mask_k, K, pid_n, NORM: tl.constexpr,
                    SILU: tl.constexpr, HAS_RESIDUAL: tl.constexpr):  # fmt: skip
        """The activations `cols` the weights multiply, and the row before its norm (NORM; else the same)."""
        dtype = x_ptr.dtype.element_ty
        if NORM:
            # RMSNorm scales the row by one number: the sum of squares accumulates beside the products
            # and the scale is applied at the end, so the weights stream from the first iteration.
            x = _load_input(x_ptr, res_ptr, cols, mask_k, HAS_RESIDUAL)
            if HAS_RESIDUAL:
                if pid_n == 0:
                    tl.store(res_out_ptr + cols, x.to(dtype), mask=mask_k)
            a = x * tl.load(norm_w_ptr + cols, mask=mask_k, other=0.0).to(tl.float32)
        elif SILU:  # the gated SiLU of x = cat(gate, up)
            gate = tl.load(x_ptr + cols, mask=mask_k, other=0.0).to(tl.float32)
            up = tl.load(x_ptr + K + cols, mask=mask_k, other=0.0).to(tl.float32)
            # torch rounds silu(gate) to the input dtype before the product; so does this.
            act = (gate / (1.0 + tl.exp(-gate))).to(dtype).to(tl.float32)
            a = (act * up).to(dtype).to(tl.float32)
            x = a
        else:
            a = tl.load(x_ptr + cols, mask=mask_k, other=0.0).to(tl.float32)
            x = a
        return a, x

    @triton.jit
    def _gemv_accumulate(acc, squares, w, x_ptr, res_ptr, res_out_ptr, norm_w_ptr, cols, mask_k, K, pid_n,
                         NORM: tl.constexpr, SILU: tl.constexpr, HAS_RESIDUAL: tl.constexpr):  # fmt: skip
        """One K tile: the weight tile w times its activations added to acc, their squares to `squares` (NORM)."""
        a, x = _gemv_input(x_ptr, res_ptr, res_out_ptr, norm_w_ptr, cols, mask_k, K, pid_n, NORM, SILU, HAS_RESIDUAL)
        if NORM:
            squares += x * x
        return acc + w.to(tl.float32) * a[None, :], squares

    @triton.jit
    def _gemv_kernel(
        x_ptr,
        res_ptr,
        res_out_ptr,
        norm_w_ptr,
        w_ptr,
        b_ptr,
        out_ptr,
        N,
        K,
        stride_x,
        stride_res,
        stride_res_out,
        stride_w,
        stride_out,
        eps,
        NORM: tl.constexpr,
        SILU: tl.constexpr,
        HAS_RESIDUAL: tl.constexpr,
        HAS_BIAS: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
        STAGES: tl.constexpr,
        USE_PDL: tl.constexpr,
    ):
        # Rows vary fastest, so the programs of one weight block run close together.
        row = tl.program_id(0)
        pid_n = tl.program_id(1)
        x_ptr += row.to(tl.int64) * stride_x
        res_ptr += row.to(tl.int64) * stride_res
        res_out_ptr += row.to(tl.int64) * stride_res_out
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_n = offs_n < N
        offs_k = tl.arange(0, BLOCK_K)
        w_rows = w_ptr + offs_n[:, None].to(tl.int64) * stride_w
        acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
        squares = tl.zeros([BLOCK_K], dtype=tl.float32)
        if STAGES > 1:
            # Triton's software pipeline copies the next STAGES - 1 weight tiles into shared memory while this
            # one is multiplied (more bytes in flight than registers hold); it pipelines no loop with a wait
            # inside, so the first copies start after the wait.
            wait_for_previous(USE_PDL)
            for k0 in tl.range(0, K, BLOCK_K, num_stages=STAGES):
                cols = k0 + offs_k
                mask_k = cols < K
                w = tl.load(w_rows + cols[None, :], mask=mask_n[:, None] & mask_k[None, :], other=0.0)
                acc, squares = _gemv_accumulate(acc, squares, w, x_ptr, res_ptr, res_out_ptr, norm_w_ptr, cols, mask_k,
                                                K, pid_n, NORM, SILU, HAS_RESIDUAL)  # fmt: skip
        else:
            # Each weight tile is loaded one iteration ahead; the first needs nothing from the kernel before this
            # one, so it is on its way before the wait.
            w = tl.load(w_rows + offs_k[None, :], mask=mask_n[:, None] & (offs_k < K)[None, :], other=0.0)
            wait_for_previous(USE_PDL)
            for k0 in range(0, K, BLOCK_K):
                cols = k0 + offs_k
                mask_k = cols < K
                acc, squares = _gemv_accumulate(acc, squares, w, x_ptr, res_ptr, res_out_ptr, norm_w_ptr, cols, mask_k,
                                                K, pid_n, NORM, SILU, HAS_RESIDUAL)  # fmt: skip
                ahead = cols + BLOCK_K
                w = tl.load(w_rows + ahead[None, :], mask=mask_n[:, None] & (ahead < K)[None, :], other=0.0)
        y = tl.sum(acc, axis=1)
        if NORM:
            y *= tl.rsqrt(tl.sum(squares, axis=0) / K + eps)
        if HAS_BIAS:
            y += tl.load(b_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)
        tl.store(out_ptr + row * stride_out + offs_n, y.to(out_ptr.dtype.element_ty), mask=mask_n)

    def _tuning_configs() -> list[triton.Config]:
        if INTERPRETED:  # one configuration: the interpreter would time every candidate
            return [triton.Config({"BLOCK_N": 4, "BLOCK_K": 64, "STAGES": 1})]
        # STAGES 1: one tile ahead in registers, the first before the wait; more: Triton's pipeline.
        return [
            triton.Config(
                {"BLOCK_N": block_n, "BLOCK_K": block_k, "STAGES": stages}, num_warps=warps, num_stages=stages
            )  # fmt: skip
            for block_n, block_k, warps in ((2, 512, 4), (4, 1024, 8), (8, 512, 8), (16, 256, 8), (32, 256, 8))
            for stages in (1, 3, 4)
        ]

    # Tuned once per (N, K, prologue) during the engine's eager warm-up, before CUDA-graph capture.
    _gemv_tuned = triton.autotune(
        _tuning_configs(),
        key=["N", "K", "NORM", "SILU", "HAS_RESIDUAL"],
        do_bench=lambda call, quantiles: triton.testing.do_bench(call, warmup=5, rep=20, quantiles=quantiles),
    )(_gemv_kernel)


def _launch(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    *,
    norm_weight: torch.Tensor | None = None,
    eps: float = 0.0,
    residual: torch.Tensor | None = None,
    silu: bool = False,
    block: tuple[int, ...] | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Run the kernel on rows of x: with the RMSNorm prologue when there is a norm weight, with the gated
    SiLU of x = cat(gate, up) when `silu`, else on x itself. `block` = (BLOCK_N, BLOCK_K[, STAGES]) bypasses tuning
    (tests)."""
    n, k = weight.shape
    in_features = x.shape[-1] // 2 if silu else x.shape[-1]
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
    args = (
        x2,
        res2,
        new_res2,
        norm_weight if norm_weight is not None else weight,
        weight,
        bias if bias is not None else weight,
        out,
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
        SILU=silu,
        HAS_RESIDUAL=residual is not None,
        HAS_BIAS=bias is not None,
        **pdl_options(x.device),
    )
    if block is None:
        grid = lambda meta: (rows, triton.cdiv(n, meta["BLOCK_N"]))  # noqa: E731
        _gemv_tuned[grid](*args, **flags)
    else:
        block_n, block_k, *stages = block
        stages = stages[0] if stages else 1
        _gemv_kernel[(rows, triton.cdiv(n, block_n))](
            *args, **flags, BLOCK_N=block_n, BLOCK_K=block_k, STAGES=stages, num_stages=stages
        )
    return out.view(*x.shape[:-1], n), new_residual


def norm_gemv_triton(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    norm_weight: torch.Tensor,
    eps: float,
    residual: torch.Tensor | None = None,
    block: tuple[int, ...] | None = None,
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
    block: tuple[int, ...] | None = None,
) -> torch.Tensor:
    """Same contract as silu_mul_gemv_ref."""
    return _launch(x, weight, bias, silu=True, block=block)[0]


def gemv_triton(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, block: tuple[int, ...] | None = None
) -> torch.Tensor:
    """Same contract as gemv_ref."""
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


def gemv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    if use_triton(x):
        return gemv_triton(x, weight, bias)
    return gemv_ref(x, weight, bias)
