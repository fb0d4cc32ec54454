"""The EAGLE-style draft head: one decoder layer of the target's shape over the fusion of a token's embedding
and the target's final hidden state at the position before it. At position t it reads (f_t, x_{t+1}) and
predicts f_{t+1}; the target's own LM head turns that into the distribution of x_{t+2}. The head reuses the
target's embedding and LM head, so it only stores the fusion layer, the decoder layer and a norm.

Two forward passes share the parameters: a paged one for serving (the layer keeps its keys and values in
a KV cache laid out like the target's) and a dense, differentiable one for training.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from slimserve.config import ModelConfig
from slimserve.distributed.state import ParallelState
from slimserve.errors import CheckpointError, ModelNotFoundError, SlimserveError
from slimserve.kernels.rotary_ref import apply_rotary_ref
from slimserve.layers.attention import AttentionMetadata
from slimserve.layers.linear import Linear
from slimserve.layers.norm import RMSNorm
from slimserve.layers.rotary import RotaryEmbedding
from slimserve.models.llama import LlamaDecoderLayer, LlamaMLP

ARCHITECTURE = "EagleDraftHead"
WEIGHTS = "model.safetensors"


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    h = x.float()
    return weight * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


class EagleHead(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.config = cfg
        hidden = cfg.hidden_size
        self.fc = Linear(2 * hidden, [hidden], bias=True)
        rotary = RotaryEmbedding(
            cfg.head_dim, cfg.max_position_embeddings, cfg.rope_theta, cfg.rope_scaling, cfg.max_context_len
        )
        parallel = ParallelState()
        self.layer = LlamaDecoderLayer(cfg, parallel, rotary, LlamaMLP(cfg, parallel))
        self.norm = RMSNorm(hidden, cfg.rms_norm_eps)

    def forward(
        self, embeds: torch.Tensor, features: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata
    ) -> torch.Tensor:
        """Paged pass over a flat batch: embeds and features [N, H] -> predicted next features [N, H]."""
        x = self.fc(torch.cat([embeds, features], dim=-1))
        x, residual = self.layer(positions, x, None, meta)
        x, _ = self.norm(x, residual)
        return x

    def forward_dense(self, embeds: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        """The same function on whole sequences [B, T, H] with causal attention, differentiable."""
        cfg = self.config
        attn = self.layer.self_attn
        batch, length, _ = embeds.shape
        x = self.fc(torch.cat([embeds, features], dim=-1))
        residual = x
        h = _rms_norm(x, self.layer.input_layernorm.weight, cfg.rms_norm_eps)
        qkv = attn.qkv_proj(h).view(batch * length, -1, attn.head_dim)
        q, k, v = qkv.split([attn.num_heads, attn.num_kv_heads, attn.num_kv_heads], dim=1)
        if attn.qk_norm:
            q = _rms_norm(q, attn.q_norm.weight, cfg.rms_norm_eps)
            k = _rms_norm(k, attn.k_norm.weight, cfg.rms_norm_eps)
        positions = torch.arange(length, device=x.device).repeat(batch)
        q, k = apply_rotary_ref(q, k, positions, attn.rotary.cos_sin_cache)
        group = attn.num_heads // attn.num_kv_heads

        def heads(t: torch.Tensor) -> torch.Tensor:
            return t.view(batch, length, -1, attn.head_dim).transpose(1, 2)

        k, v = heads(k).repeat_interleave(group, dim=1), heads(v).repeat_interleave(group, dim=1)
        out = F.scaled_dot_product_attention(heads(q), k, v, is_causal=True, scale=attn.attn.scale)
        x = attn.o_proj(out.transpose(1, 2).reshape(batch, length, -1))
        x = x + residual
        residual = x
        h = _rms_norm(x, self.layer.post_attention_layernorm.weight, cfg.rms_norm_eps)
        gate, up = self.layer.mlp.gate_up_proj(h).chunk(2, dim=-1)
        x = self.layer.mlp.down_proj(F.silu(gate) * up) + residual
        return _rms_norm(x, self.norm.weight, cfg.rms_norm_eps)

    def init_from_target(self, target: nn.Module, seed: int = 0) -> None:
        """Start from the target's last decoder layer and final norm, with the fusion passing the feature
        through and the embedding in with small random weights: the head starts near 'repeat f_t'."""
        hidden = self.config.hidden_size
        if not isinstance(target.layers[-1].mlp, LlamaMLP):
            raise SlimserveError("draft heads are trained for targets with dense MLPs (not mixtures of experts)")
        self.layer.load_state_dict(target.layers[-1].state_dict())
        self.norm.weight.data.copy_(target.norm.weight.data)
        gen = torch.Generator(device="cpu").manual_seed(seed)
        weight = torch.zeros(hidden, 2 * hidden)
        weight[:, :hidden] = torch.randn(hidden, hidden, generator=gen) * hidden**-0.5 * 0.1
        weight[:, hidden:] = torch.eye(hidden)
        self.fc.weight.data.copy_(weight)
        self.fc.bias.data.zero_()

    # ---- checkpoint ------------------------------------------------------------------------------------
    def save(self, folder: str, target_name: str, dtype: torch.dtype = torch.float32) -> None:
        """Write config.json and model.safetensors (weights in `dtype`) into `folder` atomically."""
        parent = os.path.dirname(os.path.abspath(folder))
        os.makedirs(parent, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=".eagle-", dir=parent)
        try:
            config = dict(self.config.raw)
            config.update(
                architectures=[ARCHITECTURE],
                num_hidden_layers=1,
                target_model=target_name,
                target_architecture=self.config.architecture,
            )
            with open(os.path.join(tmp, "config.json"), "w") as f:
                json.dump(config, f, indent=2)
            tensors = {name: p.detach().to(dtype).cpu().contiguous() for name, p in self.state_dict().items()}
            save_file(tensors, os.path.join(tmp, WEIGHTS))
            if os.path.isdir(folder):
                shutil.rmtree(folder)
            os.replace(tmp, folder)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise

    @classmethod
    def load(cls, folder: str, target_config: ModelConfig, device: torch.device, dtype: torch.dtype) -> EagleHead:
        config_path = os.path.join(folder, "config.json")
        if not os.path.isfile(config_path) or not os.path.isfile(os.path.join(folder, WEIGHTS)):
            raise ModelNotFoundError(f"{folder}: not a draft head folder (needs config.json and {WEIGHTS})")
        with open(config_path) as f:
            raw = json.load(f)
        if raw.get("architectures") != [ARCHITECTURE]:
            raise CheckpointError(f"{folder}: not a draft head (architectures is {raw.get('architectures')})")
        if raw.get("hidden_size") != target_config.hidden_size or raw.get("vocab_size") != target_config.vocab_size:
            raise CheckpointError(
                f"{folder}: head for hidden size {raw.get('hidden_size')} and vocabulary {raw.get('vocab_size')}, "
                f"the target has {target_config.hidden_size} and {target_config.vocab_size}"
            )
        with torch.device(device):
            head = cls(target_config)
        state = load_file(os.path.join(folder, WEIGHTS))
        missing = set(head.state_dict()) - set(state)
        if missing:
            raise CheckpointError(f"{folder}: head weights lack {sorted(missing)[0]}")
        head.load_state_dict(state)
        for param in head.parameters():  # parameters only: the rotary table stays fp32
            param.data = param.data.to(dtype)
        return head.eval()
