"""Plain-torch reference of paged attention: the oracle for the Triton kernels and the CPU path.

KV-cache layout (per layer): k_cache, v_cache of shape [num_blocks, block_size, num_kv_heads, head_dim].
A token's slot is block_id * block_size + offset; slot -1 means "padding, do not store".
"""

import torch
import torch.nn.functional as F

QUANTIZED_KV_DTYPES = (torch.float8_e4m3fn, torch.int8)


def quantize_kv_ref(x: torch.Tensor, scale: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """x [num_tokens, num_kv_heads, head_dim] in the cache's dtype: FP8 E4M3 or INT8 values of x / scale (one
    scale per KV head), or plainly cast for a cache in a float dtype."""
    if dtype not in QUANTIZED_KV_DTYPES:
        return x.to(dtype)
    scaled = x.float() / scale.float()[None, :, None]
    if dtype == torch.int8:
        return scaled.round().clamp(-128, 127).to(dtype)
    return scaled.clamp(-448.0, 448.0).to(dtype)


def dequantize_kv_ref(cache: torch.Tensor, scale: torch.Tensor | None) -> torch.Tensor:
    """Cache entries [..., num_kv_heads, head_dim] as fp32 values (times the per-head scale if quantized)."""
    if cache.dtype not in QUANTIZED_KV_DTYPES:
        return cache.float()
    return cache.float() * scale.float()[:, None]


def store_kv_ref(
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
) -> None:
    """Write k, v [num_tokens, num_kv_heads, head_dim] into the cache at slot_mapping [num_tokens]; an FP8 or
    INT8 cache stores k / k_scale and v / v_scale (per KV head)."""
    keep = slot_mapping >= 0
    slots = slot_mapping[keep].long()
    num_kv_heads, head_dim = k_cache.shape[2], k_cache.shape[3]
    k_cache.view(-1, num_kv_heads, head_dim)[slots] = quantize_kv_ref(k[keep], k_scale, k_cache.dtype)
    v_cache.view(-1, num_kv_heads, head_dim)[slots] = quantize_kv_ref(v[keep], v_scale, v_cache.dtype)


def paged_attention_ref(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    seq_lens: torch.Tensor,
    block_tables: torch.Tensor,
    scale: float,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """Causal attention of new queries over a paged KV cache (prefill, chunked prefill and decode alike).

    q: [total_q, num_heads, head_dim], the queries of all sequences packed; sequence i owns rows
    cu_seqlens_q[i]:cu_seqlens_q[i+1]. They are the *last* q_len_i tokens of a sequence of seq_lens[i]
    tokens whose keys and values (the new ones included) are already in the cache, reached through
    block_tables[i]. Sequences with seq_lens 0 (padding) produce zeros. An FP8 or INT8 cache holds values
    divided by k_scale / v_scale [num_kv_heads].
    """
    block_size, num_kv_heads, head_dim = k_cache.shape[1], k_cache.shape[2], k_cache.shape[3]
    num_heads = q.shape[1]
    out = torch.zeros_like(q)
    cu = cu_seqlens_q.tolist()
    lens = seq_lens.tolist()
    for i, seq_len in enumerate(lens):
        start, end = cu[i], cu[i + 1]
        q_len = end - start
        if q_len == 0 or seq_len == 0:
            continue
        num_blocks = -(-seq_len // block_size)
        blocks = block_tables[i, :num_blocks].long()
        k = dequantize_kv_ref(k_cache[blocks].reshape(-1, num_kv_heads, head_dim)[:seq_len], k_scale)
        v = dequantize_kv_ref(v_cache[blocks].reshape(-1, num_kv_heads, head_dim)[:seq_len], v_scale)
        group = num_heads // num_kv_heads
        k = k.repeat_interleave(group, dim=1).transpose(0, 1).float()  # [H, S, D]
        v = v.repeat_interleave(group, dim=1).transpose(0, 1).float()
        qi = q[start:end].transpose(0, 1).float()  # [H, L, D]
        q_pos = torch.arange(seq_len - q_len, seq_len, device=q.device)
        k_pos = torch.arange(seq_len, device=q.device)
        mask = k_pos[None, :] <= q_pos[:, None]
        o = F.scaled_dot_product_attention(qi, k, v, attn_mask=mask, scale=scale)
        out[start:end] = o.transpose(0, 1).to(q.dtype)
    return out
