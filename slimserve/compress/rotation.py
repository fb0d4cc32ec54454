"""Training-free rotations folded into the weights (QuaRot / SpinQuant without training): the model computes
the same function, but its weights and activations lose their outlier channels, so rounding them hurts less.

- Residual rotation Q (hidden x hidden): every RMSNorm's weight is first fused into the linears that read it
  (q/k/v, gate/up, lm_head) so that the norm commutes with Q; then the embedding and every linear writing to
  the residual stream (o_proj, down_proj) output rotated activations x Q, and every linear reading it takes
  W Q. The tied lm_head is untied (it now carries the final norm).
- Head rotation (head_dim x head_dim, one per model): v_proj outputs each head's values rotated, and o_proj
  undoes it on its input; attention mixes values per head, so it passes through unchanged.

Both fold into the weights, so nothing runs at inference time and the result is a plain Llama-style
checkpoint. The rotated model is untouched otherwise: quantize it with any scheme (RTN, GPTQ, HQQ, W4A8/W4A4)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from slimserve.compress.errors import QuantConfigError
from slimserve.compress.hadamard import random_hadamard, random_orthogonal

KINDS = ("hadamard", "orthogonal")


@dataclass
class RotationConfig:
    kind: str = "hadamard"  # "hadamard" (randomized Hadamard, QuaRot) or "orthogonal" (random, SpinQuant's start)
    residual: bool = True
    heads: bool = True
    seed: int = 0

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise QuantConfigError(f"unknown rotation {self.kind!r}; choose one of {', '.join(KINDS)}")

    def describe(self) -> dict:
        return {"kind": self.kind, "residual": self.residual, "heads": self.heads, "seed": self.seed}

    def matrix(self, n: int, generator: torch.Generator) -> torch.Tensor:
        """Built in float64, applied in float32 (its rounding error, ~1e-7, is far below any quantizer's)."""
        q = random_hadamard(n, generator) if self.kind == "hadamard" else random_orthogonal(n, generator)
        return q.float()


def _check(model: nn.Module) -> tuple[nn.Module, list[nn.Module]]:
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if inner is None or layers is None or model.get_output_embeddings() is None:
        raise QuantConfigError(f"{type(model).__name__}: rotations need a decoder with model.layers and an lm_head")
    for layer in layers:
        mlp = getattr(layer, "mlp", None)
        if not all(isinstance(getattr(mlp, n, None), nn.Linear) for n in ("gate_proj", "up_proj", "down_proj")):
            raise QuantConfigError(f"{type(model).__name__}: rotations support dense gated MLPs only (no experts)")
        norms = [type(m).__name__ for n, m in layer.named_children() if "norm" in n]
        if norms != [type(layer.input_layernorm).__name__] * 2 or "Gemma" in norms[0] or "RMSNorm" not in norms[0]:
            # Sandwich norms (Gemma) or LayerNorm (mean subtraction) do not commute with a rotation here.
            raise QuantConfigError(f"{type(model).__name__}: rotations support pre-norm RMSNorm decoders only")
    return inner, list(layers)


def _fuse_norm(norm: nn.Module, linears: list[nn.Linear]) -> None:
    w = norm.weight.float()
    for lin in linears:
        lin.weight.data = (lin.weight.float() * w.to(lin.weight.device)).to(lin.weight.dtype)
    norm.weight.data = torch.ones_like(norm.weight)


def _rotate_input(lin: nn.Module, q: torch.Tensor) -> None:
    """W <- W Q for a layer (or embedding table) whose inputs (columns) are rotated; Q moves to W's device."""
    lin.weight.data = (lin.weight.float() @ q.to(lin.weight.device)).to(lin.weight.dtype)


def _rotate_output(lin: nn.Module, q: torch.Tensor) -> None:
    q = q.to(lin.weight.device)
    lin.weight.data = (q.t() @ lin.weight.float()).to(lin.weight.dtype)
    if getattr(lin, "bias", None) is not None:
        lin.bias.data = (q.t() @ lin.bias.float()).to(lin.bias.dtype)


def _untie(model: nn.Module) -> None:
    head, emb = model.get_output_embeddings(), model.get_input_embeddings()
    if head.weight is emb.weight or head.weight.data_ptr() == emb.weight.data_ptr():
        head.weight = nn.Parameter(emb.weight.detach().clone(), requires_grad=False)
    model.config.tie_word_embeddings = False
    text = getattr(model.config, "get_text_config", lambda: None)()
    if text is not None:
        text.tie_word_embeddings = False


@torch.no_grad()
def rotate_model(model: nn.Module, config: RotationConfig) -> None:
    """Fold the rotations into the model's weights in place (float32 arithmetic, weights keep their dtype)."""
    inner, layers = _check(model)
    gen = torch.Generator().manual_seed(config.seed)
    if config.residual:
        _untie(model)
        head = model.get_output_embeddings()
        hidden = head.weight.shape[1]
        q = config.matrix(hidden, gen)
        _rotate_input(model.get_input_embeddings(), q)
        for layer in layers:
            attn, mlp = layer.self_attn, layer.mlp
            readers = [attn.q_proj, attn.k_proj, attn.v_proj]
            _fuse_norm(layer.input_layernorm, readers)
            _fuse_norm(layer.post_attention_layernorm, [mlp.gate_proj, mlp.up_proj])
            for lin in (*readers, mlp.gate_proj, mlp.up_proj):
                _rotate_input(lin, q)
            _rotate_output(attn.o_proj, q)
            _rotate_output(mlp.down_proj, q)
        _fuse_norm(inner.norm, [head])
        _rotate_input(head, q)
    if config.heads:
        head_dim = layers[0].self_attn.head_dim
        r = config.matrix(head_dim, gen)
        for layer in layers:
            attn = layer.self_attn
            kv_heads = attn.v_proj.weight.shape[0] // head_dim
            heads = attn.o_proj.weight.shape[1] // head_dim
            _rotate_output(attn.v_proj, torch.block_diag(*[r] * kv_heads))
            _rotate_input(attn.o_proj, torch.block_diag(*[r] * heads))
