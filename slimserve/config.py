"""Configuration dataclasses: the model (read from config.json), the engine and the sampling of one request."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any

import torch

from slimserve.errors import ModelNotFoundError, SamplingParamsError, SlimserveError

_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}

KV_CACHE_DTYPES = {"auto": None, "fp8": torch.float8_e4m3fn, "fp8_e4m3": torch.float8_e4m3fn, "int8": torch.int8}


def parse_layer_list(text: str, what: str) -> list[int]:
    """Decoder-layer indices written as "0,1,4" or with ranges, "0-4,7"; sorted, each once."""
    layers: set[int] = set()
    for part in filter(None, (p.strip() for p in text.split(","))):
        first, _, last = part.partition("-")
        if not first.isdigit() or (last and not last.isdigit()):
            raise SlimserveError(f"{what}: {part!r} is not a layer index or a range like 0-4")
        layers.update(range(int(first), int(last or first) + 1))
    return sorted(layers)


def check_layer_indices(layers: Any, what: str) -> list[int]:
    """A list of decoder-layer indices (or its text form): non-negative integers, sorted, each once."""
    if isinstance(layers, str):
        return parse_layer_list(layers, what)
    if not isinstance(layers, (list, tuple)) or not all(isinstance(i, int) and not isinstance(i, bool) for i in layers):
        raise SlimserveError(f"{what} must be a list of layer indices, got {layers!r}")
    if any(i < 0 for i in layers):
        raise SlimserveError(f"{what} must hold non-negative layer indices, got {list(layers)}")
    return sorted(set(layers))


def check_layers_exist(
    layers: list[int], num_layers: int, where: str, error: type[SlimserveError] = SlimserveError
) -> None:
    """One clear line naming the indices past the model's last decoder layer."""
    beyond = [i for i in layers if i >= num_layers]
    if beyond:
        raise error(f"{where}: no layer {', '.join(map(str, beyond))}; the model's layers are 0-{num_layers - 1}")


def parse_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """'auto' means bf16 on CUDA and fp32 on the CPU (where bf16 matmuls are slow and inexact)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in _DTYPES:
        raise SlimserveError(f"unknown dtype {dtype!r}; choose one of auto, {', '.join(sorted(_DTYPES))}")
    return _DTYPES[dtype]


@dataclass
class MoEConfig:
    """Mixture-of-experts fields: Mixtral, Qwen2-MoE (with a gated shared expert) and Qwen3-MoE."""

    num_experts: int
    top_k: int
    expert_intermediate_size: int
    # Renormalise the top-k softmax probabilities to sum to 1 (Mixtral always; Qwen: norm_topk_prob).
    renormalize: bool
    # Qwen rounds the routing weights to the activation dtype; Mixtral keeps them in fp32.
    round_weights: bool
    shared_expert_intermediate_size: int = 0
    # Layer i is sparse when i is not in dense_layers and (i + 1) % sparse_step == 0; others are dense MLPs.
    sparse_step: int = 1
    dense_layers: tuple[int, ...] = ()

    def is_sparse(self, layer_index: int) -> bool:
        return layer_index not in self.dense_layers and (layer_index + 1) % self.sparse_step == 0

    @classmethod
    def from_dict(cls, arch: str, cfg: dict[str, Any]) -> MoEConfig | None:
        if arch == "MixtralForCausalLM":
            return cls(
                num_experts=int(cfg.get("num_local_experts") or cfg["num_experts"]),
                top_k=int(cfg["num_experts_per_tok"]),
                expert_intermediate_size=int(cfg["intermediate_size"]),
                renormalize=True,
                round_weights=False,
            )
        if arch in ("Qwen2MoeForCausalLM", "Qwen3MoeForCausalLM"):
            return cls(
                # Real Qwen configs say num_experts; transformers 5 writes num_local_experts.
                num_experts=int(cfg.get("num_experts") or cfg["num_local_experts"]),
                top_k=int(cfg["num_experts_per_tok"]),
                expert_intermediate_size=int(cfg["moe_intermediate_size"]),
                renormalize=bool(cfg.get("norm_topk_prob", False)),
                round_weights=True,
                shared_expert_intermediate_size=int(cfg.get("shared_expert_intermediate_size") or 0)
                if arch == "Qwen2MoeForCausalLM"
                else 0,
                sparse_step=int(cfg.get("decoder_sparse_step", 1)),
                dense_layers=tuple(cfg.get("mlp_only_layers") or ()),
            )
        return None


@dataclass
class ModelConfig:
    """The subset of a Hugging Face config.json that the decoder-only families need."""

    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    qk_norm: bool = False
    rope_scaling: dict[str, Any] | None = None
    hidden_act: str = "silu"
    eos_token_ids: list[int] = field(default_factory=list)
    bos_token_id: int | None = None
    moe: MoEConfig | None = None
    raw: dict[str, Any] = field(default_factory=dict, repr=False)

    @classmethod
    def from_dict(cls, cfg: dict[str, Any]) -> ModelConfig:
        archs = cfg.get("architectures") or []
        if not archs:
            raise SlimserveError("config.json has no 'architectures' entry")
        arch = archs[0]
        heads = int(cfg["num_attention_heads"])
        hidden = int(cfg["hidden_size"])
        rope = dict(cfg.get("rope_parameters") or cfg.get("rope_scaling") or {})
        rope_theta = float(cfg.get("rope_theta", rope.get("rope_theta", 10000.0)))
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        rope_scaling = rope if rope_type not in ("default", None) else None
        eos = cfg.get("eos_token_id")
        eos_ids = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
        return cls(
            architecture=arch,
            vocab_size=int(cfg["vocab_size"]),
            hidden_size=hidden,
            intermediate_size=int(cfg["intermediate_size"]),
            num_hidden_layers=int(cfg["num_hidden_layers"]),
            num_attention_heads=heads,
            num_key_value_heads=int(cfg.get("num_key_value_heads") or heads),
            head_dim=int(cfg.get("head_dim") or hidden // heads),
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            rope_theta=rope_theta,
            max_position_embeddings=int(cfg.get("max_position_embeddings", 4096)),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            # Qwen2 always has q/k/v biases, though its config does not say so; Qwen2-MoE calls them qkv_bias.
            attention_bias=bool(
                cfg.get("attention_bias", cfg.get("qkv_bias", arch in ("Qwen2ForCausalLM", "Qwen2MoeForCausalLM")))
            ),
            qk_norm=arch in ("Qwen3ForCausalLM", "Qwen3MoeForCausalLM"),
            rope_scaling=rope_scaling,
            hidden_act=cfg.get("hidden_act", "silu"),
            eos_token_ids=eos_ids,
            bos_token_id=cfg.get("bos_token_id"),
            moe=MoEConfig.from_dict(arch, cfg),
            raw=cfg,
        )

    @property
    def max_context_len(self) -> int:
        """The longest context the model's rope supports: max_position_embeddings, stretched by the factor
        of linear, dynamic NTK and YaRN scaling (YaRN counts from its original context), as vLLM derives it."""
        scaling = self.rope_scaling or {}
        rope_type = scaling.get("rope_type", scaling.get("type", "default"))
        factor = scaling.get("factor")
        if rope_type in ("linear", "dynamic") and factor:
            return int(self.max_position_embeddings * factor)
        if rope_type == "yarn" and factor:
            return max(self.max_position_embeddings, int(scaling["original_max_position_embeddings"] * factor))
        return self.max_position_embeddings

    @classmethod
    def from_folder(cls, path: str) -> ModelConfig:
        config_path = os.path.join(path, "config.json")
        if not os.path.isfile(config_path):
            raise ModelNotFoundError(f"{path}: no config.json (not a Hugging Face model folder)")
        with open(config_path) as f:
            try:
                cfg = json.load(f)
            except json.JSONDecodeError as e:
                raise SlimserveError(f"{config_path}: invalid JSON ({e})") from e
        return cls.from_dict(cfg)


@dataclass
class EngineConfig:
    """Knobs of the inference engine, named as in vLLM."""

    model: str
    dtype: str | torch.dtype = "auto"
    device: str | None = None
    max_model_len: int | None = None
    gpu_memory_utilization: float = 0.9
    block_size: int = 16
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 8192
    enable_prefix_caching: bool = True
    # Fixed KV-cache size in blocks (otherwise sized from free memory); small values force preemption.
    num_kv_blocks: int | None = None
    enforce_eager: bool = False
    # Decode steps run back to back on the device between two scheduling decisions, when no request is
    # waiting for a slot (None: 16 on CUDA, where it hides the host's per-step work, 1 elsewhere).
    num_decode_steps: int | None = None
    seed: int = 0
    # Ranks the model is split over (attention heads, MLP features and the vocabulary).
    tensor_parallel_size: int = 1
    # MoE layers: each rank owns a contiguous range of experts and tokens travel to them (all-to-all).
    enable_expert_parallel: bool = False
    # Speculative decoding: a SpeculativeConfig, or its fields as a dict or JSON string (None: off).
    speculative_config: Any = None
    # Run the linear layers of checkpoints marked 2:4 sparse on sparse tensor cores (CUDA, fp16/bf16). Off by
    # default: measured slower than dense GEMMs on the H100 with PyTorch 2.11 (benchmarks/README.md).
    sparse_kernels: bool = False
    # KV-cache storage, as vLLM names it: auto (the model's dtype), fp8 (E4M3) or int8, with the checkpoint's
    # calibrated per-head scales (FP8 without them uses scale 1.0).
    kv_cache_dtype: str = "auto"
    # Decoder layers whose KV cache stays in the model's dtype (no scales) while the others use kv_cache_dtype,
    # e.g. [0, 1, 4] or "0-4,7"; None: the checkpoint's quantization_config.kv_cache_skip_layers, if any.
    kv_cache_skip_layers: list[int] | str | None = None
    # "auto" reads the checkpoint's weights; "dummy" fills them randomly (speed runs of a config.json alone).
    load_format: str = "auto"
    # Weight-only quantization applied at load for CPU inference: "int8" or "int4" (None keeps the weights).
    cpu_quantization: str | None = None
    # vLLM's --quantization fp8: a full-precision checkpoint's linear layers and MoE experts rounded to FP8 at load
    # (per output channel, dynamic per-token FP8 activations); the LM head and routers stay.
    quantization: str | None = None
    # Threads of CPU inference (None: the cores this process may use).
    cpu_threads: int | None = None

    def __post_init__(self) -> None:
        if self.tensor_parallel_size < 1:
            raise SlimserveError(f"tensor_parallel_size must be positive, got {self.tensor_parallel_size}")
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise SlimserveError(f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}")
        if self.block_size < 1 or self.max_num_seqs < 1 or self.max_num_batched_tokens < 1:
            raise SlimserveError("block_size, max_num_seqs and max_num_batched_tokens must be positive")
        if self.num_decode_steps is not None and self.num_decode_steps < 1:
            raise SlimserveError(f"num_decode_steps must be positive, got {self.num_decode_steps}")
        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise SlimserveError(
                f"kv_cache_dtype must be one of {', '.join(KV_CACHE_DTYPES)}, not {self.kv_cache_dtype!r}"
            )
        if self.kv_cache_skip_layers is not None:
            self.kv_cache_skip_layers = check_layer_indices(self.kv_cache_skip_layers, "kv_cache_skip_layers")
            if self.kv_cache_skip_layers and KV_CACHE_DTYPES[self.kv_cache_dtype] is None:
                raise SlimserveError("kv_cache_skip_layers needs a quantized kv_cache_dtype (fp8 or int8)")
        if self.load_format not in ("auto", "dummy"):
            raise SlimserveError(f"load_format must be auto or dummy, not {self.load_format!r}")
        if self.cpu_quantization not in (None, "int8", "int4"):
            raise SlimserveError(f"cpu_quantization must be int8 or int4, got {self.cpu_quantization!r}")
        if self.cpu_quantization is not None and self.tensor_parallel_size > 1:
            raise SlimserveError("cpu_quantization runs in one process: use tensor_parallel_size 1")
        if self.quantization not in (None, "fp8"):
            raise SlimserveError(f"quantization must be fp8, got {self.quantization!r}")
        if self.quantization is not None and (self.tensor_parallel_size > 1 or self.cpu_quantization is not None):
            raise SlimserveError("quantization fp8 runs in one process without cpu_quantization")
        if self.cpu_threads is not None and self.cpu_threads < 1:
            raise SlimserveError(f"cpu_threads must be positive, got {self.cpu_threads}")
        if self.max_model_len is not None and self.max_model_len < 1:
            raise SlimserveError(f"max_model_len must be positive, got {self.max_model_len}")
        from slimserve.engine.speculative.config import SpeculativeConfig

        self.speculative_config = SpeculativeConfig.parse(self.speculative_config)
        if self.speculative_config is not None and self.tensor_parallel_size > 1:
            # The draft and verification passes run on the driver rank alone.
            raise SlimserveError("speculative decoding needs tensor_parallel_size 1")


@dataclass
class SamplingParams:
    """Per-request sampling, with vLLM's names and defaults."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    seed: int | None = None
    max_tokens: int = 16
    stop: list[str] | str | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    logprobs: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = [s for s in (self.stop or []) if s]
        self.stop_token_ids = list(self.stop_token_ids or [])
        checks = [
            (self.temperature >= 0, f"temperature must be >= 0, got {self.temperature}"),
            (0 < self.top_p <= 1, f"top_p must be in (0, 1], got {self.top_p}"),
            (self.top_k >= -1, f"top_k must be -1, 0 (disabled) or positive, got {self.top_k}"),
            (0 <= self.min_p <= 1, f"min_p must be in [0, 1], got {self.min_p}"),
            (self.max_tokens >= 1, f"max_tokens must be >= 1, got {self.max_tokens}"),
            (self.logprobs is None or self.logprobs >= 0, f"logprobs must be >= 0, got {self.logprobs}"),
            (-2 <= self.presence_penalty <= 2, f"presence_penalty must be in [-2, 2], got {self.presence_penalty}"),
            (-2 <= self.frequency_penalty <= 2, f"frequency_penalty must be in [-2, 2], got {self.frequency_penalty}"),
        ]
        for ok, message in checks:
            if not ok:
                raise SamplingParamsError(message)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0 or self.top_k == 1
