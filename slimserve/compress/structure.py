"""Where things are in a `transformers` causal LM: the decoder layers, the linear layers to quantize, and the
"balance groups" (an operation whose output feeds some linear layers) where per-channel scales can move
between activations and weights without changing the function (SmoothQuant, AWQ)."""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import nn

from slimserve.errors import UnsupportedArchitectureError


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The stack of decoder layers: the largest ModuleList named `layers`, `h` or `blocks`."""
    best: nn.ModuleList | None = None
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and name.split(".")[-1] in ("layers", "h", "blocks"):
            if best is None or len(module) > len(best):
                best = module
    if best is None:
        raise UnsupportedArchitectureError(f"{type(model).__name__}: no decoder layer stack found")
    return best


def is_ignored(name: str, patterns: tuple[str, ...]) -> bool:
    """Plain patterns match a module name or its dotted suffix; "re:" patterns are full-match regexes."""
    for p in patterns:
        if p.startswith("re:"):
            if re.fullmatch(p[3:], name):
                return True
        elif name == p or name.endswith("." + p):
            return True
    return False


def target_linears(module: nn.Module, prefix: str, ignore: tuple[str, ...]) -> dict[str, nn.Linear]:
    """The nn.Linear submodules to quantize, by full name."""
    out = {}
    for name, sub in module.named_modules():
        full = f"{prefix}.{name}" if prefix and name else (name or prefix)
        if isinstance(sub, nn.Linear) and not is_ignored(full, ignore):
            out[full] = sub
    return out


@dataclass
class BalanceGroup:
    """`prev` produces the input of every linear in `linears` (local names inside the layer)."""

    prev: nn.Module
    prev_name: str
    linears: list[str]


def _get(layer: nn.Module, path: str) -> nn.Module | None:
    mod: nn.Module | None = layer
    for part in path.split("."):
        mod = getattr(mod, part, None)
        if mod is None:
            return None
    return mod


def balance_groups(layer: nn.Module) -> list[BalanceGroup]:
    """Llama-style layers (Llama, Mistral, Qwen2/3, Gemma): norm -> q/k/v, v -> o (without GQA),
    norm -> gate/up, up -> down. Parts a layer lacks (fused MoE experts, ...) are left out."""
    groups = []
    attn = "self_attn"
    norm1 = _get(layer, "input_layernorm")
    qkv = [f"{attn}.{p}" for p in ("q_proj", "k_proj", "v_proj")]
    if norm1 is not None and all(isinstance(_get(layer, n), nn.Linear) for n in qkv):
        groups.append(BalanceGroup(norm1, "input_layernorm", qkv))
    v, o = _get(layer, f"{attn}.v_proj"), _get(layer, f"{attn}.o_proj")
    if isinstance(v, nn.Linear) and isinstance(o, nn.Linear) and v.out_features == o.in_features:
        groups.append(BalanceGroup(v, f"{attn}.v_proj", [f"{attn}.o_proj"]))
    norm2_name = "pre_feedforward_layernorm" if _get(layer, "pre_feedforward_layernorm") else "post_attention_layernorm"
    norm2 = _get(layer, norm2_name)
    gate_up = ["mlp.gate_proj", "mlp.up_proj"]
    if norm2 is not None and all(isinstance(_get(layer, n), nn.Linear) for n in gate_up):
        groups.append(BalanceGroup(norm2, norm2_name, gate_up))
    up, down = _get(layer, "mlp.up_proj"), _get(layer, "mlp.down_proj")
    if isinstance(up, nn.Linear) and isinstance(down, nn.Linear):
        groups.append(BalanceGroup(up, "mlp.up_proj", ["mlp.down_proj"]))
    return groups


def linear_of(layer: nn.Module, name: str) -> nn.Linear:
    mod = _get(layer, name)
    assert isinstance(mod, nn.Linear), name
    return mod


@torch.no_grad()
def apply_balance(layer: nn.Module, group: BalanceGroup, s: torch.Tensor) -> None:
    """Divide the output channels of `prev` by s and multiply the input channels of the linears by s."""
    prev = group.prev
    s = s.float()
    if isinstance(prev, nn.Linear):
        prev.weight.div_(s.to(prev.weight.dtype).unsqueeze(1))
        if prev.bias is not None:
            prev.bias.div_(s.to(prev.bias.dtype))
    elif "gemma" in type(prev).__name__.lower():
        # Gemma's RMSNorm multiplies by (1 + weight).
        prev.weight.copy_(((1 + prev.weight.float()) / s - 1).to(prev.weight.dtype))
    else:
        prev.weight.div_(s.to(prev.weight.dtype))
        if getattr(prev, "bias", None) is not None:
            prev.bias.div_(s.to(prev.bias.dtype))
    for name in group.linears:
        lin = linear_of(layer, name)
        lin.weight.mul_(s.to(lin.weight.dtype).unsqueeze(0))
