"""Mixture-of-experts families on the Llama decoder: Mixtral, Qwen2-MoE (shared expert with a sigmoid
gate, q/k/v biases) and Qwen3-MoE (q/k norm). Attention, norms and the residual stream are Llama's;
the feed-forward block of each sparse layer is a SparseMoeBlock, dense layers keep Llama's MLP."""

from __future__ import annotations

import functools

import torch
from torch import nn

from slimserve.config import ModelConfig
from slimserve.distributed.state import ParallelState
from slimserve.errors import CheckpointError
from slimserve.layers.moe import EXPERT_PROJECTIONS, FusedExperts, SparseMoeBlock
from slimserve.layers.moe_fp8 import Fp8FusedExperts
from slimserve.layers.quantized import QuantizationConfig
from slimserve.layers.quantized.scheme import LinearScheme
from slimserve.models.llama import LlamaForCausalLM, LlamaMLP

# How each family's checkpoints name a layer's experts: the block, and the gate, up and down projections.
_EXPERT_NAMES = {"MixtralForCausalLM": ("block_sparse_moe", ("w1", "w3", "w2"))}
_DEFAULT_EXPERT_NAMES = ("mlp", ("gate_proj", "up_proj", "down_proj"))


def expert_scheme(cfg: ModelConfig, quant: QuantizationConfig | None, layer_index: int) -> LinearScheme | None:
    """The one scheme of every expert projection of a layer (None: full precision)."""
    if quant is None:
        return None
    block, projections = _EXPERT_NAMES.get(cfg.architecture, _DEFAULT_EXPERT_NAMES)
    prefix = f"model.layers.{layer_index}.{block}.experts"
    schemes = {quant.scheme(f"{prefix}.{e}.{p}") for e in range(cfg.moe.num_experts) for p in projections}
    if len(schemes) > 1:
        raise CheckpointError(f"{prefix}: experts are quantized differently (one scheme for all experts expected)")
    return schemes.pop()


class MoeForCausalLM(LlamaForCausalLM):
    @staticmethod
    def make_mlp(
        cfg: ModelConfig, parallel: ParallelState, layer_index: int, quant: QuantizationConfig | None = None
    ) -> nn.Module:
        moe = cfg.moe
        prefix = f"model.layers.{layer_index}.mlp"
        if moe is None or not moe.is_sparse(layer_index):
            return LlamaMLP(cfg, parallel, quant=quant, prefix=prefix)
        shared = moe.shared_expert_intermediate_size
        scheme = expert_scheme(cfg, quant, layer_index)
        # Routers stay in full precision (vLLM's and llm-compressor's rule): their logits pick the experts.
        return SparseMoeBlock(
            cfg.hidden_size,
            moe.num_experts,
            moe.top_k,
            moe.expert_intermediate_size,
            moe.renormalize,
            moe.round_weights,
            shared_expert=LlamaMLP(cfg, parallel, shared, quant, f"{prefix}.shared_expert") if shared else None,
            parallel=parallel,
            experts_class=FusedExperts if scheme is None else functools.partial(Fp8FusedExperts, scheme),
        )

    def _load_one(self, name: str, tensor: torch.Tensor) -> str | list[str] | None:
        # Mixtral names its block block_sparse_moe; ours is `mlp` in every family.
        name = name.replace(".block_sparse_moe.", ".mlp.")
        parts = name.removeprefix("model.").split(".")
        if len(parts) < 5 or parts[0] != "layers" or parts[3] != "experts":
            return super()._load_one(name, tensor)
        experts = self._experts_of(name, parts[1])
        prefix = f"layers.{parts[1]}.mlp.experts."
        # Per-expert tensors: layers.{i}.mlp.experts.{e}.{gate_proj|up_proj|down_proj|w1|w3|w2}.{weight|...}
        expert_tensor = len(parts) == 7 and parts[4].isdigit() and parts[5] in EXPERT_PROJECTIONS
        if expert_tensor and parts[6] in experts.tensor_names():
            key = experts.load_expert(name, int(parts[4]), parts[5], tensor, parts[6])
            return None if key is None else prefix + key
        # Stacked tensors, as transformers holds them in memory: layers.{i}.mlp.experts.{gate_up_proj|down_proj}
        if len(parts) == 5 and parts[4] in ("gate_up_proj", "down_proj"):
            return [prefix + key for key in experts.load_bank(name, parts[4], tensor)]
        raise CheckpointError(f"{name}: unexpected tensor for {self.config.architecture}")

    def _experts_of(self, name: str, layer: str):
        if not layer.isdigit() or int(layer) >= len(self.layers):
            raise CheckpointError(f"{name}: no such layer for {self.config.architecture}")
        mlp = self.layers[int(layer)].mlp
        if not isinstance(mlp, SparseMoeBlock):
            raise CheckpointError(f"{name}: layer {layer} is dense in {self.config.architecture}")
        return mlp.experts
