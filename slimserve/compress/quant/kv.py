"""KV-cache quantization: keys (after RoPE) and values are quantized as they enter the cache, with static
scales calibrated per KV head (k_scale, v_scale buffers on the attention module, shape (heads, 1, 1)).

The attention module's `past_key_values` argument is wrapped by a proxy whose `update` quantizes the new
keys and values before handing them to the real cache, so the attention reads what a quantized cache holds."""

from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from slimserve.compress.args import QuantArgs
from slimserve.compress.quant import qdq


class KVObserver:
    """Running max |k| and |v| per KV head."""

    def __init__(self) -> None:
        self.k: torch.Tensor | None = None
        self.v: torch.Tensor | None = None

    @staticmethod
    def _absmax(x: torch.Tensor) -> torch.Tensor:
        return x.detach().abs().amax(dim=(0, 2, 3)).float()  # (batch, heads, seq, head_dim) -> (heads,)

    def add(self, k: torch.Tensor, v: torch.Tensor) -> None:
        ka, va = self._absmax(k), self._absmax(v)
        self.k = ka if self.k is None else torch.maximum(self.k, ka)
        self.v = va if self.v is None else torch.maximum(self.v, va)


class _CacheProxy:
    def __init__(self, attn: nn.Module, inner: Any, args: QuantArgs | None, observer: KVObserver | None) -> None:
        self.attn, self.inner, self.args, self.observer = attn, inner, args, observer

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any):
        if self.observer is not None:
            self.observer.add(key_states, value_states)
        if self.args is not None:
            key_states = qdq.fake_quantize_activation(key_states, self.args, self.attn.k_scale)
            value_states = qdq.fake_quantize_activation(value_states, self.args, self.attn.v_scale)
        if self.inner is None:
            return key_states, value_states
        return self.inner.update(key_states, value_states, *args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


def cache_argument(attn: nn.Module) -> str:
    """The name of the attention forward's cache argument: transformers 5 renamed past_key_values to cache."""
    return "cache" if "cache" in inspect.signature(attn.forward).parameters else "past_key_values"


def attach(attn: nn.Module, args: QuantArgs | None, observer: KVObserver | None = None) -> RemovableHandle:
    """Route the attention module's cache writes through quantization (args) and/or an observer."""
    key = cache_argument(attn)

    def hook(module: nn.Module, a: tuple, kwargs: dict) -> tuple[tuple, dict]:
        kwargs[key] = _CacheProxy(module, kwargs.get(key), args, observer)
        return a, kwargs

    return attn.register_forward_pre_hook(hook, with_kwargs=True)


def set_scales(attn: nn.Module, observer: KVObserver, args: QuantArgs, dtype: torch.dtype) -> None:
    """k_scale and v_scale from the observed ranges: absmax / qmax, per head or per tensor."""
    for name, absmax in (("k_scale", observer.k), ("v_scale", observer.v)):
        if args.strategy == "tensor":
            absmax = absmax.amax().reshape(1)
        else:
            absmax = absmax.reshape(-1, 1, 1)
        scale = torch.where(absmax > 0, absmax / args.qmax, torch.ones_like(absmax)).to(dtype)
        attn.register_buffer(name, scale)


def attention_modules(layer: nn.Module) -> list[nn.Module]:
    """Attention submodules whose forward takes a cache argument."""
    return [m for m in layer.modules() if hasattr(m, "k_proj") and hasattr(m, "v_proj") and hasattr(m, "o_proj")]
