"""Multi-head to grouped-query (or multi-query) attention by mean-pooling the key and value heads of each new
group (Ainslie et al., 2023). The KV cache shrinks by old/new KV heads; distillation recovers the quality."""

from __future__ import annotations

import re

import torch
from torch import nn

from slimserve.compress.errors import QuantConfigError
from slimserve.compress.prune.rebuild import check_supported, head_dim, rebuild


@torch.no_grad()
def convert_gqa(model: nn.Module, num_kv_heads: int) -> nn.Module:
    """A new model with `num_kv_heads` KV heads (1 = MQA); each is the mean of the old heads it replaces."""
    check_supported(model)
    cfg = model.config
    old, hd = cfg.num_key_value_heads, head_dim(cfg)
    if num_kv_heads <= 0 or old % num_kv_heads:
        raise QuantConfigError(f"--kv-heads {num_kv_heads} must divide the model's {old} KV heads")
    if num_kv_heads == old:
        raise QuantConfigError(f"the model already has {old} KV heads")
    pool = old // num_kv_heads
    state = {}
    for name, t in model.state_dict().items():
        if re.search(r"self_attn\.[kv]_proj\.(weight|bias)$", name):
            t = t.float().reshape(num_kv_heads, pool, hd, *t.shape[1:]).mean(1)
            t = t.reshape(num_kv_heads * hd, *t.shape[2:]).to(model.dtype)
        state[name] = t.detach().clone()
    return rebuild(model, {"num_key_value_heads": num_kv_heads, "head_dim": hd}, state)
