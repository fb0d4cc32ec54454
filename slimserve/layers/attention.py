"""Paged attention over the KV cache (the new keys/values are written by the fused prologue first)."""

from dataclasses import dataclass

import torch
from torch import nn

from slimserve.errors import CheckpointError
from slimserve.kernels.attention import paged_attention


@dataclass
class AttentionMetadata:
    """Flat-batch description of one forward pass, shared by every layer.

    slot_mapping [num_tokens]: cache slot of each new token (-1: padding).
    cu_seqlens_q [num_seqs + 1]: where each sequence's new tokens start in the flat batch.
    seq_lens [num_seqs]: each sequence's length after this step (cached prefix + new tokens).
    block_tables [num_seqs, max_blocks]: KV blocks of each sequence.
    max_seqlen_q: the longest run of new tokens (host int; 1 for a pure decode step).
    """

    slot_mapping: torch.Tensor
    cu_seqlens_q: torch.Tensor
    seq_lens: torch.Tensor
    block_tables: torch.Tensor
    max_seqlen_q: int


class PagedAttention(nn.Module):
    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.scale = head_dim**-0.5
        # Views into the engine's KV-cache tensors, bound by the runner once the cache is allocated.
        self.k_cache = torch.empty(0)
        self.v_cache = torch.empty(0)
        # Per-KV-head scales of an FP8/INT8 cache (stored = value / scale), from the checkpoint's kv_cache_scheme;
        # 1.0 otherwise (and unused by a cache in the model's dtype).
        self.k_scale = torch.ones(num_kv_heads, dtype=torch.float32)
        self.v_scale = torch.ones(num_kv_heads, dtype=torch.float32)
        self.has_kv_scales = False

    def load_kv_scale(self, name: str, which: str, tensor: torch.Tensor) -> None:
        """A calibrated k_scale / v_scale: one per KV head or one for all of them."""
        flat = tensor.float().reshape(-1)
        if flat.numel() not in (1, self.num_kv_heads):
            raise CheckpointError(f"{name}: {flat.numel()} scales for {self.num_kv_heads} KV heads")
        getattr(self, which).copy_(flat.expand(self.num_kv_heads))
        self.has_kv_scales = True

    def forward(self, q: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        return paged_attention(
            q,
            self.k_cache,
            self.v_cache,
            meta.cu_seqlens_q,
            meta.seq_lens,
            meta.block_tables,
            self.scale,
            max_seqlen_q=meta.max_seqlen_q,
            k_scale=self.k_scale,
            v_scale=self.v_scale,
        )
