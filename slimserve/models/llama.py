"""The Llama family as one model: Llama 2/3/3.1/3.2, Mistral, Qwen2/2.5 (q/k/v bias) and Qwen3 (q/k norm).

Input is a flat batch of tokens from many sequences (no padding); attention finds each token's
sequence and its KV blocks through AttentionMetadata.
"""

from collections.abc import Iterable

import torch
from torch import nn

from slimserve.config import ModelConfig
from slimserve.distributed.layers import AttentionHeads, ColumnParallelLinear, RowParallelLinear, VocabPartition
from slimserve.distributed.state import ParallelState
from slimserve.errors import CheckpointError
from slimserve.kernels.activation import silu_and_mul
from slimserve.kernels.gemv import gemv, norm_gemv, silu_mul_gemv
from slimserve.kernels.quant_gemm import int_gemv_norm, int_gemv_supported
from slimserve.kernels.quant_gemm_ref import NormIn, NormOut
from slimserve.kernels.rope_store import rope_and_store
from slimserve.layers.attention import AttentionMetadata, PagedAttention
from slimserve.layers.linear import Linear
from slimserve.layers.norm import RMSNorm
from slimserve.layers.quantized import QuantizationConfig, QuantLinearBase, make_quantized_linear
from slimserve.layers.quantized.int_weight import IntWeightLinear
from slimserve.layers.rotary import RotaryEmbedding

# Hugging Face projection name -> (our fused module, shard index).
_FUSED = {
    "q_proj": ("qkv_proj", 0),
    "k_proj": ("qkv_proj", 1),
    "v_proj": ("qkv_proj", 2),
    "gate_proj": ("gate_up_proj", 0),
    "up_proj": ("gate_up_proj", 1),
}


def _quantized(
    quant: QuantizationConfig | None,
    parallel: ParallelState,
    names: list[str],
    in_features: int,
    shard_sizes: list[int],
    bias: bool = False,
) -> QuantLinearBase | None:
    """The quantized layer for these Hugging Face projections, None where the checkpoint keeps them dense."""
    layer = make_quantized_linear(quant, names, in_features, shard_sizes, bias)
    if layer is not None and parallel.is_parallel:
        raise CheckpointError("quantized checkpoints run in one process (tensor_parallel_size 1)")
    return layer


# Up to this many rows, a decoder layer runs the fused norm/SiLU GEMVs instead of GEMMs with separate norm and
# activation kernels. One row only: each row's program streams the weights again, so at 2-8 rows (a small decode
# batch, a speculative verification) cuBLAS is faster on the H100 (benchmarks/kernel_speed.py --parts gemv).
FUSED_GEMV_MAX_ROWS = 1


def _streamable(linear: nn.Module) -> bool:
    """A dense weight matrix that the fused decode GEMVs can read (not quantized, not 2:4-compressed)."""
    return isinstance(linear, Linear) and type(linear.weight.data) is torch.Tensor


class LlamaAttention(nn.Module):
    def __init__(
        self,
        cfg: ModelConfig,
        parallel: ParallelState,
        rotary: RotaryEmbedding,
        quant: QuantizationConfig | None = None,
        prefix: str = "",
    ) -> None:
        super().__init__()
        # This rank's heads: all of them in a single process, a slice under tensor parallelism.
        heads = AttentionHeads.partition(cfg.num_attention_heads, cfg.num_key_value_heads, parallel)
        self.num_heads = heads.num_heads
        self.num_kv_heads = heads.num_kv_heads
        self.head_dim = cfg.head_dim
        q_size, kv_size = cfg.num_attention_heads * self.head_dim, cfg.num_key_value_heads * self.head_dim
        self.q_size = self.num_heads * self.head_dim
        qkv_names = [f"{prefix}.{p}" for p in ("q_proj", "k_proj", "v_proj")]
        self.qkv_proj = _quantized(
            quant, parallel, qkv_names, cfg.hidden_size, [q_size, kv_size, kv_size], cfg.attention_bias
        ) or ColumnParallelLinear(
            cfg.hidden_size,
            [q_size, kv_size, kv_size],
            parallel,
            bias=cfg.attention_bias,
            shard_ranges=heads.qkv_ranges(self.head_dim),
        )
        self.o_proj = _quantized(quant, parallel, [f"{prefix}.o_proj"], q_size, [cfg.hidden_size]) or RowParallelLinear(
            q_size, cfg.hidden_size, parallel
        )
        if cfg.qk_norm:
            self.q_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps)
            self.k_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps)
        self.qk_norm = cfg.qk_norm
        self.rms_norm_eps = cfg.rms_norm_eps
        self.rotary = rotary  # one cos/sin table shared by all layers (at 256K positions it is 64 MiB)
        self.attn = PagedAttention(self.num_heads, self.num_kv_heads, self.head_dim)

    def forward(self, positions: torch.Tensor, x: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        return self.attend(positions, self.qkv_proj(x), meta)

    def attend(self, positions: torch.Tensor, qkv: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """Attention and the output projection, from the q|k|v projection."""
        out = self.heads(positions, qkv, meta)
        o_proj = self.o_proj
        if out.shape[0] <= FUSED_GEMV_MAX_ROWS and _streamable(o_proj) and not o_proj.parallel.is_parallel:
            return gemv(out, o_proj.weight, o_proj.bias)  # chained to its neighbours like the fused GEMVs
        return o_proj(out)

    def heads(self, positions: torch.Tensor, qkv: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """The attention heads' output [tokens, heads * head_dim], from the q|k|v projection."""
        # One fused prologue: q/k norm (Qwen3), rotary, and the new keys/values written into the cache.
        q = rope_and_store(
            qkv,
            positions,
            self.rotary.cos_sin_cache,
            self.attn.k_cache,
            self.attn.v_cache,
            meta.slot_mapping,
            self.num_heads,
            self.num_kv_heads,
            self.q_norm.weight if self.qk_norm else None,
            self.k_norm.weight if self.qk_norm else None,
            self.rms_norm_eps,
            k_scale=self.attn.k_scale,
            v_scale=self.attn.v_scale,
        )
        return self.attn(q, meta).reshape(-1, self.q_size)


class LlamaMLP(nn.Module):
    def __init__(
        self,
        cfg: ModelConfig,
        parallel: ParallelState,
        intermediate_size: int | None = None,
        quant: QuantizationConfig | None = None,
        prefix: str = "",
    ) -> None:
        super().__init__()
        inter = intermediate_size or cfg.intermediate_size
        names = [f"{prefix}.gate_proj", f"{prefix}.up_proj"]
        self.gate_up_proj = _quantized(quant, parallel, names, cfg.hidden_size, [inter] * 2) or ColumnParallelLinear(
            cfg.hidden_size, [inter] * 2, parallel
        )
        self.down_proj = _quantized(
            quant, parallel, [f"{prefix}.down_proj"], inter, [cfg.hidden_size]
        ) or RowParallelLinear(inter, cfg.hidden_size, parallel)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(silu_and_mul(self.gate_up_proj(x)))


class LlamaDecoderLayer(nn.Module):
    def __init__(
        self,
        cfg: ModelConfig,
        parallel: ParallelState,
        rotary: RotaryEmbedding,
        mlp: nn.Module,
        quant: QuantizationConfig | None = None,
        prefix: str = "",
    ) -> None:
        super().__init__()
        self.self_attn = LlamaAttention(cfg, parallel, rotary, quant, f"{prefix}.self_attn")
        self.mlp = mlp
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(
        self, positions: torch.Tensor, x: torch.Tensor, residual: torch.Tensor | None, meta: AttentionMetadata
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if x.shape[0] <= FUSED_GEMV_MAX_ROWS and _streamable(self.self_attn.qkv_proj):
            return self._forward_few_rows(positions, x, residual, meta)
        # The residual add is fused into the next norm: each norm returns (normed, new residual).
        if residual is None:
            residual, x = x, self.input_layernorm(x)
        else:
            x, residual = self.input_layernorm(x, residual)
        x = self.self_attn(positions, x, meta)
        x, residual = self.post_attention_layernorm(x, residual)
        return self.mlp(x), residual

    def _forward_few_rows(
        self, positions: torch.Tensor, x: torch.Tensor, residual: torch.Tensor | None, meta: AttentionMetadata
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """A few rows with a dense q|k|v: each norm (with its residual add) and the gated SiLU run inside the
        GEMV after it, so the layer is a few kernels that stream weights instead of a dozen small ones."""
        attn, mlp = self.self_attn, self.mlp
        norm1, norm2 = self.input_layernorm, self.post_attention_layernorm
        qkv_proj = attn.qkv_proj
        qkv, residual = norm_gemv(x, qkv_proj.weight, qkv_proj.bias, norm1.weight, norm1.eps, residual)
        x = attn.attend(positions, qkv, meta)
        dense_mlp = isinstance(mlp, LlamaMLP) and _streamable(mlp.gate_up_proj) and _streamable(mlp.down_proj)
        if not dense_mlp or mlp.down_proj.parallel.is_parallel:
            x, residual = norm2(x, residual)
            return mlp(x), residual
        gate_up_proj = mlp.gate_up_proj
        gate_up, residual = norm_gemv(x, gate_up_proj.weight, gate_up_proj.bias, norm2.weight, norm2.eps, residual)
        return silu_mul_gemv(gate_up, mlp.down_proj.weight, mlp.down_proj.bias), residual

    def chains_norms(self) -> bool:
        """Whether the layer's four projections are integer GEMVs that can carry the RMSNorms in their epilogues
        (forward_chained): A16 integer weights without act order, bias (q|k|v aside) or a CPU INT8 kernel."""
        attn, mlp = self.self_attn, self.mlp
        if not isinstance(mlp, LlamaMLP):
            return False
        linears = (attn.qkv_proj, attn.o_proj, mlp.gate_up_proj, mlp.down_proj)
        return all(
            isinstance(lin, IntWeightLinear) and lin.scheme.act is None and lin.perm is None
            and lin.cpu_int8 is None and int_gemv_supported(lin.qweight, None)
            and (lin.bias is None or lin is attn.qkv_proj)
            for lin in linears
        )  # fmt: skip

    def forward_chained(
        self,
        positions: torch.Tensor,
        x: torch.Tensor,
        residual: torch.Tensor,
        norm_in: NormIn | None,
        meta: AttentionMetadata,
        sums: torch.Tensor,
        next_norm: RMSNorm | None,
    ) -> tuple[torch.Tensor, torch.Tensor, NormIn | None]:
        """A few rows through integer GEMVs that carry the RMSNorms (chains_norms): x is the input norm's
        h * gain, finished by the q|k|v GEMV's epilogue with `norm_in` (None: x is already normalised); the
        output projection adds the residual and prepares the post-attention norm, the gate|up GEMV applies the
        SiLU-and-multiply (no activation kernel), the down projection the next
        layer's (`next_norm`; sums [2, rows] fp32 zeros receive the sums of squares). Returns the next layer's
        (x, residual, norm_in), or after the last layer (down's output, residual, None) for the final norm."""
        attn, mlp, norm2 = self.self_attn, self.mlp, self.post_attention_layernorm
        qkv, _ = int_gemv_norm(x, attn.qkv_proj.qweight, norm_in)
        out = attn.heads(positions, attn.qkv_proj.add_bias(qkv), meta)
        h, x = int_gemv_norm(out, attn.o_proj.qweight, None, NormOut(residual, norm2.weight, sums[0]))
        act, _ = int_gemv_norm(x, mlp.gate_up_proj.qweight, NormIn(sums[0], norm2.eps), gated=True)
        if next_norm is None:
            return int_gemv_norm(act, mlp.down_proj.qweight)[0], h, None
        h, x = int_gemv_norm(act, mlp.down_proj.qweight, None, NormOut(h, next_norm.weight, sums[1]))
        return x, h, NormIn(sums[1], next_norm.eps)


class LlamaForCausalLM(nn.Module):
    def __init__(
        self, cfg: ModelConfig, parallel: ParallelState | None = None, quantization: str | None = None
    ) -> None:
        """quantization: round a full-precision checkpoint at load ("fp8"); None keeps the checkpoint's format."""
        super().__init__()
        self.config = cfg
        self.parallel = parallel or ParallelState()
        # Embedding and LM head hold this rank's rows of the vocabulary (all of it in a single process).
        self.vocab = VocabPartition(cfg.vocab_size, self.parallel)
        rows = self.vocab.rows_per_rank
        self.embed_tokens = nn.Parameter(torch.empty(rows, cfg.hidden_size), requires_grad=False)
        rotary = RotaryEmbedding(
            cfg.head_dim, cfg.max_position_embeddings, cfg.rope_theta, cfg.rope_scaling, cfg.max_context_len
        )
        # Quantized checkpoints choose each projection's layer class by its Hugging Face module name.
        self.quant = QuantizationConfig.for_model(cfg.raw, quantization)
        self.layers = nn.ModuleList(
            LlamaDecoderLayer(
                cfg, self.parallel, rotary, self.make_mlp(cfg, self.parallel, i, self.quant), self.quant,
                f"model.layers.{i}",
            )
            for i in range(cfg.num_hidden_layers)
        )  # fmt: skip
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        # A quantized output head (a checkpoint that quantizes lm_head) replaces the dense one.
        self.head_linear: nn.Module | None = _quantized(
            self.quant, self.parallel, ["lm_head"], cfg.hidden_size, [cfg.vocab_size]
        )
        self.lm_head: torch.Tensor | None
        if self.head_linear is not None:
            if cfg.tie_word_embeddings:
                raise CheckpointError("lm_head is quantized but tied to the embedding (tie_word_embeddings)")
            self.lm_head = None
        elif cfg.tie_word_embeddings:
            self.lm_head = self.embed_tokens
        else:
            self.lm_head = nn.Parameter(torch.empty(rows, cfg.hidden_size), requires_grad=False)
        self._chains: bool | None = None  # every layer's projections can carry the norms (decided once loaded)
        self._norm_sums: torch.Tensor | None = None

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """Hidden states [num_tokens, hidden] after the final norm."""
        x = self.vocab.embed(input_ids, self.embed_tokens)
        if x.shape[0] <= FUSED_GEMV_MAX_ROWS and self._chained_layers():
            return self._forward_chained(positions, x, meta)
        residual = None
        for layer in self.layers:
            x, residual = layer(positions, x, residual, meta)
        x, _ = self.norm(x, residual)
        return x

    def _chained_layers(self) -> bool:
        if self._chains is None:
            self._chains = all(layer.chains_norms() for layer in self.layers)
        return self._chains

    def _forward_chained(self, positions: torch.Tensor, x: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """A few rows of an integer-weight model: each RMSNorm split between the GEMVs around it, so a layer
        runs no norm kernel (LlamaDecoderLayer.forward_chained); only the first and the final norm run alone."""
        if self._norm_sums is None or self._norm_sums.device != x.device:
            # One buffer for the whole forward pass (CUDA graphs replay its address), zeroed once per step.
            self._norm_sums = torch.empty(len(self.layers), 2, FUSED_GEMV_MAX_ROWS, device=x.device)
        sums = self._norm_sums
        sums.zero_()
        residual, x = x, self.layers[0].input_layernorm(x)
        norm_in = None
        for i, layer in enumerate(self.layers):
            next_norm = self.layers[i + 1].input_layernorm if i + 1 < len(self.layers) else None
            x, residual, norm_in = layer.forward_chained(positions, x, residual, norm_in, meta, sums[i], next_norm)
        x, _ = self.norm(x, residual)
        return x

    @staticmethod
    def make_mlp(
        cfg: ModelConfig, parallel: ParallelState, layer_index: int, quant: QuantizationConfig | None = None
    ) -> nn.Module:
        """The feed-forward block of layer `layer_index` (families with experts override it)."""
        return LlamaMLP(cfg, parallel, quant=quant, prefix=f"model.layers.{layer_index}.mlp")

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits over the whole vocabulary, on every rank."""
        if self.head_linear is not None:
            return self.head_linear(hidden)
        return self.vocab.logits(hidden, self.lm_head)

    def attention_layers(self) -> list[PagedAttention]:
        return [layer.self_attn.attn for layer in self.layers]

    def load_weights(self, tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copy Hugging Face-named tensors into the model; every parameter (every shard of a fused one)
        must be filled."""
        expected = set()
        for name, module in self.named_modules():
            if hasattr(module, "shard_keys"):  # parameters filled piece by piece (fused projections, experts)
                expected |= {f"{name}.{key}" for key in module.shard_keys()}
        sharded_params = {key.split("#")[0] for key in expected}
        expected |= {n for n, _ in self.named_parameters() if n not in sharded_params}
        if self.config.tie_word_embeddings:
            expected.discard("lm_head")
        for name, tensor in tensors:
            filled = self._load_one(name, tensor)
            expected -= {filled} if isinstance(filled, str) else set(filled or ())
        if expected:
            raise CheckpointError(f"checkpoint lacks {len(expected)} tensors, e.g. {sorted(expected)[0]}")
        for module in self.modules():
            if hasattr(module, "finish_loading"):  # quantized layers and FP8 expert banks convert once loaded
                module.finish_loading()

    def _load_one(self, name: str, tensor: torch.Tensor) -> str | list[str] | None:
        """Load one tensor; returns the key(s) of what it filled (None for tensors that are not needed)."""
        if "rotary_emb.inv_freq" in name:
            return None
        short = name.removeprefix("model.")
        if short == "embed_tokens.weight":
            self.vocab.load(name, self.embed_tokens, tensor)
            return "embed_tokens"
        if short.startswith("lm_head.") and self.head_linear is not None:
            param_name = short.removeprefix("lm_head.")
            self.head_linear.load_shard(name, param_name, tensor)
            return f"head_linear.{param_name}#0"
        if short == "lm_head.weight":
            if self.config.tie_word_embeddings:
                return None  # some tied checkpoints still store the head; it equals the embedding
            self.vocab.load(name, self.lm_head, tensor)
            return "lm_head"
        if short == "norm.weight":
            return self._copy(name, "norm.weight", self.norm.weight, tensor)
        parts = short.split(".")  # layers.{i}.{self_attn|mlp|...}.{...}.{weight|bias}
        if parts[0] != "layers" or len(parts) < 4 or not parts[1].isdigit():
            raise CheckpointError(f"{name}: unexpected tensor for {self.config.architecture}")
        layer_index = int(parts[1])
        if layer_index >= len(self.layers):
            raise CheckpointError(f"{name}: layer {layer_index} beyond num_hidden_layers={len(self.layers)}")
        prefix = f"layers.{layer_index}."
        if parts[2:] in (["self_attn", "k_scale"], ["self_attn", "v_scale"]):
            self.layers[layer_index].self_attn.attn.load_kv_scale(name, parts[3], tensor)
            return None
        if parts[-2] in _FUSED:
            fused, shard = _FUSED[parts[-2]]
            path = ".".join([*parts[2:-2], fused])
            try:
                module = self.layers[layer_index].get_submodule(path)
            except AttributeError:
                raise CheckpointError(f"{name}: unexpected tensor for {self.config.architecture}") from None
            module.load_shard(name, parts[-1], tensor, shard)
            return f"{prefix}{path}.{parts[-1]}#{shard}"
        local = ".".join(parts[2:])
        try:
            module_path, param_name = local.rsplit(".", 1)
            module = self.layers[layer_index].get_submodule(module_path)
        except (AttributeError, ValueError):
            raise CheckpointError(f"{name}: unexpected tensor for {self.config.architecture}") from None
        if isinstance(module, (Linear, QuantLinearBase)):
            module.load_shard(name, param_name, tensor)
            return f"{prefix}{local}#0"
        param = getattr(module, param_name, None)
        if not isinstance(param, nn.Parameter):
            raise CheckpointError(f"{name}: unexpected tensor for {self.config.architecture}")
        return self._copy(name, prefix + local, param, tensor)

    @staticmethod
    def _copy(name: str, target: str, param: torch.Tensor, tensor: torch.Tensor) -> str:
        if tuple(tensor.shape) != tuple(param.shape):
            raise CheckpointError(f"{name}: shape {tuple(tensor.shape)}, expected {tuple(param.shape)}")
        if not tensor.is_floating_point():
            raise CheckpointError(f"{name}: dtype {tensor.dtype}, expected a floating-point tensor")
        param.data.copy_(tensor)
        return target
