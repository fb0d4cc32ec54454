"""Minitron-style importance from activations on calibration data (Muralidharan et al., 2024): attention
heads by the norm of their output, MLP channels and embedding channels by their mean absolute activation
(after the MLP nonlinearity; after every RMSNorm), whole layers by block importance, 1 - cos(input, output)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from tqdm import tqdm

from slimserve.compress.prune.rebuild import head_dim
from slimserve.compress.structure import decoder_layers


@dataclass
class Importance:
    heads: torch.Tensor  # (layers, attention heads)
    mlp: torch.Tensor  # (layers, intermediate channels)
    hidden: torch.Tensor  # (hidden channels,)
    layers: torch.Tensor  # (layers,) block importance
    tokens: int

    def to_dict(self) -> dict:
        return {"layers": self.layers.tolist(), "tokens": self.tokens}


@torch.no_grad()
def estimate_importance(
    model: nn.Module, samples: list[torch.Tensor], device: torch.device, progress: bool = True
) -> Importance:
    cfg = model.config
    layers = decoder_layers(model)
    n, heads, hd = len(layers), cfg.num_attention_heads, head_dim(cfg)
    acc = {
        "heads": torch.zeros(n, heads, device=device),
        "mlp": torch.zeros(n, cfg.intermediate_size, device=device),
        "hidden": torch.zeros(cfg.hidden_size, device=device),
        "layers": torch.zeros(n, device=device),
    }
    handles = []

    def add_heads(i):
        def hook(mod, args):
            x = args[0].float()
            acc["heads"][i] += x.reshape(-1, heads, hd).norm(dim=-1).sum(0)

        return hook

    def add_mlp(i):
        def hook(mod, args):
            acc["mlp"][i] += args[0].float().reshape(-1, args[0].shape[-1]).abs().sum(0)

        return hook

    def add_hidden(mod, args, out):
        acc["hidden"] += out.float().reshape(-1, out.shape[-1]).abs().sum(0)

    def add_block(i):
        def hook(mod, args, kwargs, out):
            x = args[0] if args else kwargs["hidden_states"]
            y = out[0] if isinstance(out, tuple) else out
            cos = nn.functional.cosine_similarity(x.float(), y.float(), dim=-1)
            acc["layers"][i] += (1 - cos).sum()

        return hook

    for i, layer in enumerate(layers):
        handles.append(layer.self_attn.o_proj.register_forward_pre_hook(add_heads(i)))
        handles.append(layer.mlp.down_proj.register_forward_pre_hook(add_mlp(i)))
        handles.append(layer.register_forward_hook(add_block(i), with_kwargs=True))
        for norm in (layer.input_layernorm, layer.post_attention_layernorm):
            handles.append(norm.register_forward_hook(add_hidden))
    home = next(model.parameters()).device
    tokens = 0
    try:
        model.to(device)
        for ids in tqdm(samples, desc="importance", disable=not progress):
            model(input_ids=ids.to(device), use_cache=False)
            tokens += ids.numel()
    finally:
        model.to(home)
        for h in handles:
            h.remove()
    return Importance(**{k: (v / max(tokens, 1)).cpu() for k, v in acc.items()}, tokens=tokens)
