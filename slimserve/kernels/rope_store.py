"""The attention prologue in one Triton launch (beside rope_store_ref.py): per (token, head), read the
head from the fused q|k|v projection, apply q/k RMSNorm when the model has it, rotate q and k, write q out
and k, v into the paged KV cache. In a decode step this replaces six small launches per layer."""

import torch

from slimserve.kernels.common import pdl_options
from slimserve.kernels.dispatch import HAS_TRITON, INTERPRETED, use_triton
from slimserve.kernels.rope_store_ref import rope_and_store_ref

if HAS_TRITON:
    import triton
    import triton.language as tl

    from slimserve.kernels.common import wait_for_previous
    from slimserve.kernels.fp8_quant import round_e4m3

    @triton.jit
    def _quantize_for_cache(x, scale, KV_QUANT: tl.constexpr, ON_GRID: tl.constexpr):
        """x / scale as a quantized cache stores it: FP8 (KV_QUANT 1) or INT8 (2) values, in fp32."""
        r = x.to(tl.float32) / scale
        if KV_QUANT == 1:
            r = round_e4m3(tl.minimum(tl.maximum(r, -448.0), 448.0), ON_GRID)
        else:
            r = tl.where(r >= 0, tl.floor(r + 0.5), tl.ceil(r - 0.5))  # round half away from zero
            r = tl.minimum(tl.maximum(r, -128.0), 127.0)
        return r

    @triton.jit
    def _rope_store_kernel(
        qkv_ptr,
        pos_ptr,
        cos_sin_ptr,
        q_norm_ptr,
        k_norm_ptr,
        q_out_ptr,
        k_cache_ptr,
        v_cache_ptr,
        slot_ptr,
        k_scale_ptr,
        v_scale_ptr,
        stride_qkv_t,
        stride_q_out_t,
        stride_cos_sin,
        eps,
        NUM_HEADS: tl.constexpr,
        NUM_KV_HEADS: tl.constexpr,
        HALF: tl.constexpr,
        BLOCK_HALF: tl.constexpr,
        HAS_NORM: tl.constexpr,
        KV_QUANT: tl.constexpr,
        ON_GRID: tl.constexpr,
        USE_PDL: tl.constexpr,
    ):
        t = tl.program_id(0).to(tl.int64)
        h = tl.program_id(1)
        offs = tl.arange(0, BLOCK_HALF)
        mask = offs < HALF
        # Slots, positions and the rotary table are the step's inputs, not the previous kernel's output: they
        # load before the wait.
        slot = tl.load(slot_ptr + t).to(tl.int64)
        pos = tl.load(pos_ptr + t).to(tl.int64)
        cos = tl.load(cos_sin_ptr + pos * stride_cos_sin + offs, mask=mask, other=0.0)
        sin = tl.load(cos_sin_ptr + pos * stride_cos_sin + HALF + offs, mask=mask, other=0.0)
        wait_for_previous(USE_PDL)
        src = qkv_ptr + t * stride_qkv_t + h * (2 * HALF)
        x1 = tl.load(src + offs, mask=mask, other=0.0)
        x2 = tl.load(src + HALF + offs, mask=mask, other=0.0)
        dtype = x1.dtype
        # Stores into the cache are bounded to nothing for padding tokens (slot -1).
        cache_mask = offs < tl.where(slot >= 0, HALF, 0)
        kv_row = slot * (NUM_KV_HEADS * 2 * HALF)
        if h < NUM_HEADS + NUM_KV_HEADS:
            a = x1.to(tl.float32)
            b = x2.to(tl.float32)
            if HAS_NORM:
                if h < NUM_HEADS:
                    w1 = tl.load(q_norm_ptr + offs, mask=mask, other=0.0).to(tl.float32)
                    w2 = tl.load(q_norm_ptr + HALF + offs, mask=mask, other=0.0).to(tl.float32)
                else:
                    w1 = tl.load(k_norm_ptr + offs, mask=mask, other=0.0).to(tl.float32)
                    w2 = tl.load(k_norm_ptr + HALF + offs, mask=mask, other=0.0).to(tl.float32)
                rstd = 1.0 / tl.sqrt((tl.sum(a * a, axis=0) + tl.sum(b * b, axis=0)) / (2 * HALF) + eps)
                # Round where the reference rounds: normalised value, then its product with the weight.
                a = ((a * rstd).to(dtype).to(tl.float32) * w1).to(dtype).to(tl.float32)
                b = ((b * rstd).to(dtype).to(tl.float32) * w2).to(dtype).to(tl.float32)
            o1 = (a * cos - b * sin).to(dtype)
            o2 = (b * cos + a * sin).to(dtype)
            if h < NUM_HEADS:
                # Each branch names its own pointer: a name bound in both would need one type in both.
                q_dst = q_out_ptr + t * stride_q_out_t + h * (2 * HALF)
                tl.store(q_dst + offs, o1, mask=mask)
                tl.store(q_dst + HALF + offs, o2, mask=mask)
            else:
                k_dst = k_cache_ptr + kv_row + (h - NUM_HEADS) * (2 * HALF)
                k_ty = k_cache_ptr.dtype.element_ty
                # No variable changes type inside a runtime branch (the compiler refuses that).
                if KV_QUANT != 0:
                    ks = tl.load(k_scale_ptr + h - NUM_HEADS)
                    tl.store(k_dst + offs, _quantize_for_cache(o1, ks, KV_QUANT, ON_GRID).to(k_ty), mask=cache_mask)
                    tl.store(
                        k_dst + HALF + offs, _quantize_for_cache(o2, ks, KV_QUANT, ON_GRID).to(k_ty), mask=cache_mask
                    )
                else:
                    tl.store(k_dst + offs, o1.to(k_ty), mask=cache_mask)
                    tl.store(k_dst + HALF + offs, o2.to(k_ty), mask=cache_mask)
        else:
            v_dst = v_cache_ptr + kv_row + (h - NUM_HEADS - NUM_KV_HEADS) * (2 * HALF)
            v_ty = v_cache_ptr.dtype.element_ty
            if KV_QUANT != 0:
                vs = tl.load(v_scale_ptr + h - NUM_HEADS - NUM_KV_HEADS)
                tl.store(v_dst + offs, _quantize_for_cache(x1, vs, KV_QUANT, ON_GRID).to(v_ty), mask=cache_mask)
                tl.store(v_dst + HALF + offs, _quantize_for_cache(x2, vs, KV_QUANT, ON_GRID).to(v_ty), mask=cache_mask)
            else:
                tl.store(v_dst + offs, x1.to(v_ty), mask=cache_mask)
                tl.store(v_dst + HALF + offs, x2.to(v_ty), mask=cache_mask)


def rope_and_store_triton(
    qkv: torch.Tensor,
    positions: torch.Tensor,
    cos_sin_cache: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    num_heads: int,
    num_kv_heads: int,
    q_norm_weight: torch.Tensor | None = None,
    k_norm_weight: torch.Tensor | None = None,
    eps: float = 1e-6,
    *,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    head_dim = k_cache.shape[-1]
    assert qkv.stride(-1) == 1 and k_cache.is_contiguous() and v_cache.is_contiguous()
    kv_quant = {torch.float8_e4m3fn: 1, torch.int8: 2}.get(k_cache.dtype, 0)
    assert kv_quant or qkv.dtype == k_cache.dtype == v_cache.dtype, "qkv and a float KV cache must share a dtype"
    assert not kv_quant or (k_scale is not None and v_scale is not None), "a quantized KV cache needs its scales"
    num_tokens = qkv.shape[0]
    q_out = torch.empty(num_tokens, num_heads, head_dim, dtype=qkv.dtype, device=qkv.device)
    if num_tokens == 0:
        return q_out
    has_norm = q_norm_weight is not None
    half = head_dim // 2
    _rope_store_kernel[(num_tokens, num_heads + 2 * num_kv_heads)](
        qkv,
        positions,
        cos_sin_cache,
        q_norm_weight if has_norm else qkv,
        k_norm_weight if has_norm else qkv,
        q_out,
        k_cache,
        v_cache,
        slot_mapping,
        k_scale if kv_quant else slot_mapping,
        v_scale if kv_quant else slot_mapping,
        qkv.stride(0),
        q_out.stride(0),
        cos_sin_cache.stride(0),
        eps,
        NUM_HEADS=num_heads,
        NUM_KV_HEADS=num_kv_heads,
        HALF=half,
        BLOCK_HALF=triton.next_power_of_2(half),
        HAS_NORM=has_norm,
        KV_QUANT=kv_quant,
        ON_GRID=INTERPRETED,
        num_warps=1,
        **pdl_options(qkv.device),
    )
    return q_out


def rope_and_store(
    qkv: torch.Tensor,
    positions: torch.Tensor,
    cos_sin_cache: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    num_heads: int,
    num_kv_heads: int,
    q_norm_weight: torch.Tensor | None = None,
    k_norm_weight: torch.Tensor | None = None,
    eps: float = 1e-6,
    *,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """rope_and_store_ref's contract."""
    fn = rope_and_store_triton if use_triton(qkv) else rope_and_store_ref
    return fn(
        qkv,
        positions,
        cos_sin_cache,
        k_cache,
        v_cache,
        slot_mapping,
        num_heads,
        num_kv_heads,
        q_norm_weight,
        k_norm_weight,
        eps,
        k_scale=k_scale,
        v_scale=v_scale,
    )
