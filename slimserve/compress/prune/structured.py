"""Structured (Minitron-style) pruning: remove the least important attention heads, MLP channels, embedding
channels and whole layers, and rebuild a smaller model of the same architecture (an ordinary Hugging Face
model: nothing about it is sparse)."""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass

import torch
from torch import nn

from slimserve.compress.errors import QuantConfigError
from slimserve.compress.prune.importance import Importance
from slimserve.compress.prune.rebuild import check_supported, count_parameters, head_dim, rebuild

MLP_STEP = 64  # channel counts stay multiples of these (GEMM-friendly shapes)
HIDDEN_ALIGN = 8  # embedding widths stay multiples of this and of the head count (transformers requires it)
MIN_RATIO = 0.25


@dataclass
class StructuredShape:
    """The target shape; None keeps a dimension as it is."""

    hidden_size: int | None = None
    intermediate_size: int | None = None
    heads_per_kv_group: int | None = None
    drop_layers: int = 0
    mha_heads: int | None = None  # multi-head models: heads kept, each with its own key/value head

    def to_dict(self) -> dict:
        return asdict(self)


def parse_param_count(text: str) -> int:
    """'0.7B', '100M', '1.5e8' -> a parameter count."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([kKmMbB]?)\s*", text)
    if m is None:
        raise QuantConfigError(f"--target-params {text!r}: expected a count like 0.7B, 100M or 1.5e8")
    scale = {"": 1, "k": 1e3, "m": 1e6, "b": 1e9}[m.group(2).lower()]
    return int(float(m.group(1)) * scale)


def _hidden_step(heads: int) -> int:
    return math.lcm(HIDDEN_ALIGN, heads)


def _round(value: float, step: int, full: int) -> int:
    return max(step, min(full, int(round(value / step)) * step))


def shape_from_ratios(
    config,
    mlp_ratio: float | None = None,
    hidden_ratio: float | None = None,
    heads: int | None = None,
    drop_layers: int = 0,
) -> StructuredShape:
    for name, r in (("--mlp-ratio", mlp_ratio), ("--hidden-ratio", hidden_ratio)):
        if r is not None and not 0 < r <= 1:
            raise QuantConfigError(f"{name} must be in (0, 1], not {r}")
    if not 0 <= drop_layers < config.num_hidden_layers:
        raise QuantConfigError(f"--drop-layers must be in [0, {config.num_hidden_layers}), not {drop_layers}")
    full_h, full_i = config.hidden_size, config.intermediate_size
    kept_heads = heads or config.num_attention_heads
    hidden = None if hidden_ratio is None else _round(full_h * hidden_ratio, _hidden_step(kept_heads), full_h)
    mlp = None if mlp_ratio is None else _round(full_i * mlp_ratio, MLP_STEP, full_i)
    shape = StructuredShape(hidden, mlp, drop_layers=drop_layers)
    n_heads, kv = config.num_attention_heads, config.num_key_value_heads
    if heads is None or heads == n_heads:
        return shape
    if kv == n_heads:  # multi-head attention: a head goes with its key/value head
        if not 0 < heads < n_heads:
            raise QuantConfigError(f"--heads must be between 1 and {n_heads}")
        shape.mha_heads = heads
        return shape
    if heads <= 0 or heads % kv or heads > n_heads:
        raise QuantConfigError(f"--heads must be a multiple of the {kv} KV heads, at most {n_heads}")
    shape.heads_per_kv_group = heads // kv
    return shape


def count_for(model: nn.Module, shape: StructuredShape) -> int:
    """Parameters of the model `shape` would produce, from a model built on the meta device."""
    from transformers import AutoModelForCausalLM

    cfg = type(model.config).from_dict({**model.config.to_dict(), **_config_updates(model.config, shape)})
    cfg.__dict__.pop("quantization_config", None)
    with torch.device("meta"):
        return count_parameters(AutoModelForCausalLM.from_config(cfg))


def shape_for_target(model: nn.Module, target: int) -> StructuredShape:
    """Width-only pruning to at most `target` parameters (Minitron prefers width to depth): shrink the MLP and
    the embedding width in turn, whichever is still relatively wider, until the count fits, then widen the
    MLP again as far as the target allows."""
    cfg = model.config
    if target >= count_parameters(model):
        raise QuantConfigError(f"--target-params {target:,} is not below the model's {count_parameters(model):,}")
    shape = StructuredShape(cfg.hidden_size, cfg.intermediate_size)
    while count_for(model, shape) > target:
        mlp_left = shape.intermediate_size / cfg.intermediate_size
        hid_left = shape.hidden_size / cfg.hidden_size
        if max(mlp_left, hid_left) - 1e-9 <= MIN_RATIO:
            raise QuantConfigError(f"--target-params {target:,} needs more than {1 - MIN_RATIO:.0%} width pruning")
        if mlp_left >= hid_left:
            shape.intermediate_size -= MLP_STEP
        else:
            shape.hidden_size -= _hidden_step(cfg.num_attention_heads)
    # A coarse embedding step can overshoot: give MLP channels back while the count still fits.
    while shape.intermediate_size + MLP_STEP <= cfg.intermediate_size:
        wider = StructuredShape(shape.hidden_size, shape.intermediate_size + MLP_STEP)
        if count_for(model, wider) > target:
            break
        shape = wider
    return shape


def _config_updates(config, shape: StructuredShape) -> dict:
    hd = head_dim(config)
    out = {"head_dim": hd}
    if shape.hidden_size is not None:
        out["hidden_size"] = shape.hidden_size
    if shape.intermediate_size is not None:
        out["intermediate_size"] = shape.intermediate_size
    if shape.heads_per_kv_group is not None:
        out["num_attention_heads"] = shape.heads_per_kv_group * config.num_key_value_heads
    if shape.mha_heads is not None:
        out["num_attention_heads"] = out["num_key_value_heads"] = shape.mha_heads
    if shape.drop_layers:
        out["num_hidden_layers"] = config.num_hidden_layers - shape.drop_layers
        for key in ("layer_types", "max_window_layers"):
            if isinstance(getattr(config, key, None), list):
                out[key] = None  # set from the kept layers in apply_structured
    return out


def _top(score: torch.Tensor, k: int) -> torch.Tensor:
    return torch.topk(score, k).indices.sort().values


@torch.no_grad()
def apply_structured(model: nn.Module, importance: Importance, shape: StructuredShape) -> nn.Module:
    """The smaller model (a new module; `model` is left as it was)."""
    check_supported(model)
    cfg = model.config
    hd, kv = head_dim(cfg), cfg.num_key_value_heads
    n_layers, groups = cfg.num_hidden_layers, cfg.num_attention_heads // kv
    hid = _top(importance.hidden, shape.hidden_size) if shape.hidden_size else torch.arange(cfg.hidden_size)
    keep_layers = sorted(_top(importance.layers, n_layers - shape.drop_layers).tolist())
    updates = _config_updates(cfg, shape)
    if "layer_types" in updates:
        updates["layer_types"] = [cfg.layer_types[i] for i in keep_layers]
    updates.pop("max_window_layers", None)

    def head_rows(layer: int) -> torch.Tensor:
        if shape.mha_heads is not None:
            heads = _top(importance.heads[layer], shape.mha_heads)
            return (heads.unsqueeze(1) * hd + torch.arange(hd)).reshape(-1)
        if shape.heads_per_kv_group is None:
            return torch.arange(cfg.num_attention_heads * hd)
        score = importance.heads[layer].reshape(kv, groups)
        keep = torch.topk(score, shape.heads_per_kv_group, dim=1).indices.sort(dim=1).values
        heads = (keep + torch.arange(kv).unsqueeze(1) * groups).reshape(-1)
        return (heads.unsqueeze(1) * hd + torch.arange(hd)).reshape(-1)

    state: dict[str, torch.Tensor] = {}
    for name, t in model.state_dict().items():
        t = t.detach()
        m = re.match(r"(.*\.layers)\.(\d+)\.(.*)", name)
        if m is None:
            if name.endswith(("embed_tokens.weight", "lm_head.weight")):
                t = t[:, hid]
            elif name.endswith("norm.weight"):
                t = t[hid]
            state[name] = t.clone()
            continue
        prefix, index, rest = m.group(1), int(m.group(2)), m.group(3)
        if index not in keep_layers:
            continue
        new_name = f"{prefix}.{keep_layers.index(index)}.{rest}"
        mlp = _top(importance.mlp[index], shape.intermediate_size) if shape.intermediate_size else None
        rows = head_rows(index)
        if rest in ("input_layernorm.weight", "post_attention_layernorm.weight"):
            t = t[hid]
        elif rest == "self_attn.q_proj.weight":
            t = t[rows][:, hid]
        elif rest == "self_attn.q_proj.bias":
            t = t[rows]
        elif rest in ("self_attn.k_proj.weight", "self_attn.v_proj.weight"):
            t = t[:, hid] if shape.mha_heads is None else t[rows][:, hid]
        elif rest in ("self_attn.k_proj.bias", "self_attn.v_proj.bias"):
            t = t if shape.mha_heads is None else t[rows]
        elif rest == "self_attn.o_proj.weight":
            t = t[hid][:, rows]
        elif rest == "self_attn.o_proj.bias":
            t = t[hid]
        elif rest in ("mlp.gate_proj.weight", "mlp.up_proj.weight"):
            t = t[:, hid] if mlp is None else t[mlp][:, hid]
        elif rest == "mlp.down_proj.weight":
            t = t[hid] if mlp is None else t[hid][:, mlp]
        elif rest not in ("self_attn.q_norm.weight", "self_attn.k_norm.weight"):
            raise QuantConfigError(f"{name}: structured pruning does not know this tensor")
        state[new_name] = t.clone()
    return rebuild(model, updates, state)
