"""Plain-torch reference of the attention prologue: split the fused q|k|v projection, apply the optional
per-head q/k RMSNorm (Qwen3) and rotary embedding, and write k and v into the paged KV cache."""

import torch

from slimserve.kernels.attention_ref import store_kv_ref
from slimserve.kernels.norm_ref import rms_norm_ref
from slimserve.kernels.rotary_ref import apply_rotary_ref


def rope_and_store_ref(
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
    """qkv [N, (num_heads + 2 * num_kv_heads) * head_dim] -> rotated queries [N, num_heads, head_dim];
    the rotated keys and the values go to the cache at slot_mapping (-1: skip), quantized with the per-head
    k_scale / v_scale when the cache is FP8 or INT8."""
    head_dim = k_cache.shape[-1]
    heads = qkv.view(qkv.shape[0], num_heads + 2 * num_kv_heads, head_dim)
    q, k, v = heads.split([num_heads, num_kv_heads, num_kv_heads], dim=1)
    if q_norm_weight is not None:
        q = rms_norm_ref(q, q_norm_weight, eps)
        k = rms_norm_ref(k, k_norm_weight, eps)
    q, k = apply_rotary_ref(q, k, positions, cos_sin_cache)
    store_kv_ref(k, v, k_cache, v_cache, slot_mapping, k_scale, v_scale)
    return q
