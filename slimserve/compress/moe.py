"""MoE experts as linear layers of their own, for calibration and for the checkpoint.

`transformers` keeps a layer's experts as two 3D tensors (gate_up_proj: experts x 2I x H, down_proj:
experts x H x I) and loops over them. Calibration needs each expert's projections as modules that hooks
can observe, and checkpoints (and the runtimes that read them) name each expert's projections separately
(`mlp.experts.3.gate_proj`, or `block_sparse_moe.experts.3.w1` for Mixtral). `unfuse_experts` swaps every
fused expert bank for an equivalent list of per-expert MLPs routed exactly like the original, so every
expert is calibrated on the tokens the router really sends it and counts them."""

from __future__ import annotations

import torch
from torch import nn

# Per-expert projection names (gate, up, down) as checkpoints store them, by model type.
_PROJECTION_NAMES = {"mixtral": ("w1", "w3", "w2")}
_DEFAULT_PROJECTION_NAMES = ("gate_proj", "up_proj", "down_proj")
# Module paths that checkpoints of a model type spell differently from `transformers`' module tree.
_CHECKPOINT_RENAMES = {"mixtral": (".mlp.experts.", ".block_sparse_moe.experts.")}


class ExpertMLP(nn.Module):
    """One expert: down(act(gate(x)) * up(x)), with the projections under their checkpoint names."""

    def __init__(self, gate: nn.Linear, up: nn.Linear, down: nn.Linear, names: tuple[str, str, str], act: nn.Module):
        super().__init__()
        self.names = names
        for name, lin in zip(names, (gate, up, down)):
            self.add_module(name, lin)
        self.act_fn = act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up, down = (getattr(self, n) for n in self.names)
        return down(self.act_fn(gate(x)) * up(x))


class UnfusedExperts(nn.ModuleList):
    """Drop-in for a fused expert bank: same call (hidden_states, top_k_index, top_k_weights), same result.

    With `calibrate_all` set, every expert also runs on every token so that hooks see all of them (as
    llm-compressor's option of that name does); the output still sums the routed experts only."""

    def __init__(self, experts: list[ExpertMLP]) -> None:
        super().__init__(experts)
        self.tokens_seen = [0] * len(experts)  # tokens each expert ran on (all of them under calibrate_all)
        self.calibrate_all = False

    def forward(
        self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
    ) -> torch.Tensor:
        out = torch.zeros_like(hidden_states)
        for e, expert in enumerate(self):
            token_idx, slot = torch.where(top_k_index == e)
            self.tokens_seen[e] += hidden_states.shape[0] if self.calibrate_all else token_idx.numel()
            if self.calibrate_all:
                routed = expert(hidden_states)[token_idx]
            elif token_idx.numel():
                routed = expert(hidden_states[token_idx])
            else:
                continue
            weighted = routed * top_k_weights[token_idx, slot, None]
            out.index_add_(0, token_idx, weighted.to(out.dtype))
        return out


def _is_fused_bank(module: nn.Module) -> bool:
    gate_up, down = getattr(module, "gate_up_proj", None), getattr(module, "down_proj", None)
    return (
        isinstance(gate_up, nn.Parameter)
        and isinstance(down, nn.Parameter)
        and gate_up.ndim == 3
        and down.ndim == 3
        and hasattr(module, "act_fn")
    )


def _linear(weight: torch.Tensor) -> nn.Linear:
    lin = nn.Linear(weight.shape[1], weight.shape[0], bias=False, device="meta", dtype=weight.dtype)
    lin.weight = nn.Parameter(weight.detach().clone(), requires_grad=False)
    return lin


@torch.no_grad()
def unfuse_experts(model: nn.Module) -> list[UnfusedExperts]:
    """Replace every fused expert bank in the model by an UnfusedExperts, in place; returns them."""
    model_type = getattr(getattr(model, "config", None), "model_type", "")
    names = _PROJECTION_NAMES.get(model_type, _DEFAULT_PROJECTION_NAMES)
    banks = []
    for parent_name, parent in list(model.named_modules()):
        for child_name, child in list(parent.named_children()):
            if not _is_fused_bank(child):
                continue
            if getattr(child, "has_bias", False):
                raise NotImplementedError(f"{parent_name}.{child_name}: expert biases are not supported")
            half = child.gate_up_proj.shape[1] // 2
            experts = [
                ExpertMLP(_linear(gu[:half]), _linear(gu[half:]), _linear(d), names, child.act_fn)
                for gu, d in zip(child.gate_up_proj, child.down_proj)
            ]
            bank = UnfusedExperts(experts)
            setattr(parent, child_name, bank)
            banks.append(bank)
    return banks


def checkpoint_name(model_type: str, name: str) -> str:
    """A tensor's name as the model type's checkpoints spell it."""
    rename = _CHECKPOINT_RENAMES.get(model_type)
    return name.replace(*rename) if rename else name


def uncalibrated_experts(model: nn.Module) -> list[str]:
    """Experts that the router sent no calibration token (their weights were rounded without data)."""
    out = []
    for name, module in model.named_modules():
        if isinstance(module, UnfusedExperts):
            out += [f"{name}.{e}" for e, n in enumerate(module.tokens_seen) if n == 0]
    return out
