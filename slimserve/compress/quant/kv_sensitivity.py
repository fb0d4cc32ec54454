"""Which layers' KV cache loses the most when quantized: the model runs with its keys (after RoPE) and values
transformed as they enter the attention, one layer quantized at a time, and each variant's next-token
distribution is compared with the unquantized model's (KL divergence). Queries and the attention arithmetic
are never rounded, as in the engine's quantized cache."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch
from torch import nn

from slimserve.compress.args import QuantArgs
from slimserve.compress.quant import kv, qdq
from slimserve.eval.metrics import compare

# A cache transform: (layer index, keys, values) [batch, kv heads, tokens, head_dim] -> what the cache returns.
Transform = Callable[[int, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
Scales = list[tuple[torch.Tensor, torch.Tensor]]  # per layer: k_scale, v_scale


class _Cache:
    """Stands in for the attention's cache argument: `update` returns the transformed keys and values."""

    def __init__(self, transform: Transform, index: int) -> None:
        self.transform, self.index = transform, index

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        return self.transform(self.index, key_states, value_states)


def _swap_cache(cache: _Cache, key: str, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    kwargs[key] = cache
    return args, kwargs


class CacheVariant(nn.Module):
    """The model whose attention layers read their keys and values through `transform`."""

    def __init__(self, model: nn.Module, transform: Transform) -> None:
        super().__init__()
        self.model, self.transform = model, transform

    def forward(self, **kwargs):
        handles = [
            attn.register_forward_pre_hook(
                partial(_swap_cache, _Cache(self.transform, i), kv.cache_argument(attn)), with_kwargs=True
            )
            for i, attn in enumerate(kv.attention_modules(self.model))
        ]
        try:
            return self.model(**kwargs)
        finally:
            for h in handles:
                h.remove()


@torch.no_grad()
def run_through(model: nn.Module, samples: list[torch.Tensor], transform: Transform) -> None:
    """One forward pass per sample with every layer's keys and values handed to `transform`."""
    device = next(model.parameters()).device
    for ids in samples:
        CacheVariant(model, transform)(input_ids=ids.to(device), use_cache=False)


def observe(model: nn.Module, samples: list[torch.Tensor]) -> list[kv.KVObserver]:
    """Per layer: max |k| and |v| per KV head over the samples."""
    observers = [kv.KVObserver() for _ in kv.attention_modules(model)]

    def record(i: int, k: torch.Tensor, v: torch.Tensor):
        observers[i].add(k, v)
        return k, v

    run_through(model, samples, record)
    return observers


def scales(obs: kv.KVObserver, args: QuantArgs) -> tuple[torch.Tensor, torch.Tensor]:
    """k_scale and v_scale exactly as the compressor writes them to the checkpoint."""
    holder = nn.Module()
    kv.set_scales(holder, obs, args, torch.float32)
    return holder.k_scale, holder.v_scale


def static(per_layer: Scales, args: QuantArgs, keys: bool = True, values: bool = True) -> Transform:
    """Keys and/or values rounded with static scales, as a quantized cache stores them."""

    def fn(i: int, k: torch.Tensor, v: torch.Tensor):
        ks, vs = per_layer[i]
        k = qdq.fake_quantize_activation(k, args, ks.to(k.device)) if keys else k
        v = qdq.fake_quantize_activation(v, args, vs.to(v.device)) if values else v
        return k, v

    return fn


def _only(inner: Transform, layer: int, i: int, k: torch.Tensor, v: torch.Tensor):
    return inner(i, k, v) if i == layer else (k, v)


def sensitivity(
    model: nn.Module, transform: Transform, wins: list[torch.Tensor], progress: bool = False
) -> list[float]:
    """Per layer: the KL divergence from the model when only that layer's cache goes through `transform`."""
    layers = len(kv.attention_modules(model))
    variants = {str(j): CacheVariant(model, partial(_only, transform, j)) for j in range(layers)}
    quality = compare(model, variants, wins, progress=progress)
    return [quality[str(j)].kl_divergence for j in range(layers)]


def layer_kl(model: nn.Module, samples: list[torch.Tensor], args: QuantArgs) -> list[float]:
    """Per layer: the KL divergence its quantized cache alone causes on the samples, with static scales
    calibrated on the same samples (max |k|, |v|)."""
    per_layer = [scales(o, args) for o in observe(model, samples)]
    return sensitivity(model, static(per_layer, args), samples)


def most_sensitive(kl: list[float], n: int) -> list[int]:
    """The n layers of the largest KL divergence, in layer order."""
    return sorted(sorted(range(len(kl)), key=lambda j: -kl[j])[:n])
