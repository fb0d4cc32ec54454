"""2:4 sparse linear layers on CUDA: a weight whose every 4 consecutive inputs hold at most 2 non-zeros is
stored compressed (values + metadata) and multiplied by sparse tensor cores (cuSPARSELt / CUTLASS through
torch.sparse.to_sparse_semi_structured). On the CPU, or for shapes the kernels do not take, the dense weight
stays."""

from __future__ import annotations

import torch
from torch import nn

from slimserve.layers.linear import Linear

# Smallest dense shapes the semi-structured kernels accept: rows and columns multiples of these.
MIN_ROWS, MIN_COLS = 32, 64


def is_24_sparse(w: torch.Tensor) -> bool:
    """Every group of 4 consecutive inputs in every row has at most 2 non-zeros."""
    if w.shape[-1] % 4:
        return False
    return bool(((w.reshape(w.shape[0], -1, 4) != 0).sum(-1) <= 2).all())


def sparse_structure(raw_config: dict) -> str | None:
    """The checkpoint's `sparsity_config.sparsity_structure` (e.g. "2:4"), if any."""
    q = raw_config.get("quantization_config") or {}
    return (q.get("sparsity_config") or {}).get("sparsity_structure")


def _row_major_output(module: nn.Module, inputs: tuple, out: torch.Tensor) -> torch.Tensor:
    """The sparse GEMM computes (W x^T)^T and may hand back a transposed view; the engine's kernels that read
    the projection (rope/KV write, attention) need unit stride along the features."""
    return out.contiguous()


def use_sparse_24(model: nn.Module) -> list[str]:
    """Swap the weight of every 2:4-sparse engine Linear for its compressed form; the names swapped."""
    from torch.sparse import to_sparse_semi_structured

    swapped = []
    for name, mod in model.named_modules():
        if not isinstance(mod, Linear):
            continue
        w = mod.weight.data
        if w.device.type != "cuda" or w.dtype not in (torch.float16, torch.bfloat16):
            continue
        if w.shape[0] % MIN_ROWS or w.shape[1] % MIN_COLS or not is_24_sparse(w):
            continue
        mod.weight = nn.Parameter(to_sparse_semi_structured(w), requires_grad=False)
        mod.register_forward_hook(_row_major_output)
        swapped.append(name)
    return swapped
