"""A GGUF file (llama.cpp's format) read as a Hugging Face checkpoint: config.json, tensor names and weights.

Weights come out dequantized to float32 under transformers' names and layouts, so a folder written from them
equals what transformers computes when it loads the GGUF itself.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from gguf import GGMLQuantizationType as Q
from gguf import GGUFReader, ReaderTensor
from gguf.quants import dequantize

from slimserve.errors import CheckpointError, ModelNotFoundError, UnsupportedArchitectureError

GGUF_MAGIC = b"GGUF"
SUPPORTED_TYPES = frozenset(
    {Q.F32, Q.F16, Q.BF16, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q8_0, Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K}
)

# GGUF per-layer tensor -> transformers module inside `model.layers.N`.
LAYER_MODULES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
GLOBAL_MODULES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_CORE_LAYER_TENSORS = ("attn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")


@dataclass(frozen=True)
class Family:
    """How one GGUF architecture maps onto a transformers model class."""

    hf_architecture: str
    model_type: str
    layer_tensors: tuple[str, ...]
    # llama.cpp's Llama converter interleaves the two rotary halves of every q/k head; transformers does not.
    permute_qk: bool = False
    # Gemma's converter stores norm weights as 1 + w (transformers' Gemma norms multiply by 1 + w).
    norm_offset: float = 0.0
    renames: dict[str, str] = field(default_factory=dict)


FAMILIES: dict[str, Family] = {
    "llama": Family("LlamaForCausalLM", "llama", (*_CORE_LAYER_TENSORS, "ffn_norm"), permute_qk=True),
    "qwen2": Family("Qwen2ForCausalLM", "qwen2", (*_CORE_LAYER_TENSORS, "ffn_norm")),
    "qwen3": Family("Qwen3ForCausalLM", "qwen3", (*_CORE_LAYER_TENSORS, "ffn_norm", "attn_q_norm", "attn_k_norm")),
    "gemma3": Family(
        "Gemma3ForCausalLM",
        "gemma3_text",
        (*_CORE_LAYER_TENSORS, "ffn_norm", "attn_q_norm", "attn_k_norm", "post_attention_norm", "post_ffw_norm"),
        norm_offset=1.0,
        renames={
            "ffn_norm": "pre_feedforward_layernorm",
            "post_attention_norm": "post_attention_layernorm",
            "post_ffw_norm": "post_feedforward_layernorm",
        },
    ),
}
# Mistral GGUFs say "llama"; only the model name tells them apart.
MISTRAL = Family("MistralForCausalLM", "mistral", FAMILIES["llama"].layer_tensors, permute_qk=True)


@dataclass(frozen=True)
class TensorInfo:
    """One tensor of the file: its GGUF and transformers names, transformers shape and storage type."""

    gguf_name: str
    hf_name: str
    shape: tuple[int, ...]
    ggml_type: Q


@dataclass
class GGUFCheckpoint:
    """A GGUF file opened and checked: config, generation config and tensor list, weights read on demand."""

    path: str
    architecture: str
    family: Family
    config: dict[str, Any]
    generation_config: dict[str, Any]
    tensors: list[TensorInfo]
    reader: GGUFReader = field(repr=False)
    raw_tensors: dict[str, ReaderTensor] = field(repr=False)

    def metadata(self, key: str, default: Any = None) -> Any:
        entry = self.reader.fields.get(key)
        return default if entry is None else entry.contents()

    def read_tensor(self, info: TensorInfo) -> torch.Tensor:
        """The tensor dequantized to float32, in transformers' layout."""
        raw = self.raw_tensors[info.gguf_name]
        try:
            array = dequantize(raw.data, raw.tensor_type).reshape(info.shape)
        except (ValueError, NotImplementedError) as e:
            raise CheckpointError(f"{self.path}: cannot dequantize tensor {info.gguf_name} ({e})") from e
        array = np.array(array, dtype=np.float32)  # a copy: F32 data is a read-only view of the file
        module = info.gguf_name.split(".")[-2]
        if self.family.permute_qk and module in ("attn_q", "attn_k"):
            heads_key = "num_attention_heads" if module == "attn_q" else "num_key_value_heads"
            array = _undo_rotary_interleave(array, self.config[heads_key])
        if self.family.norm_offset and info.hf_name.endswith("norm.weight"):
            array -= np.float32(self.family.norm_offset)
        return torch.from_numpy(array)


def open_gguf(path: str) -> GGUFCheckpoint:
    """Open and check a GGUF file; raise our errors (one line naming the file) for anything wrong with it."""
    reader = _open_reader(path)
    field_ = reader.fields.get("general.architecture")
    architecture = field_.contents() if field_ is not None else None
    if architecture not in FAMILIES:
        raise UnsupportedArchitectureError(
            f"{path}: GGUF architecture {architecture!r} is not supported (supported: {', '.join(FAMILIES)})"
        )
    family = FAMILIES[architecture]
    name_field = reader.fields.get("general.name")
    if architecture == "llama" and name_field is not None and "mistral" in name_field.contents().lower():
        family = MISTRAL
    raw = {tensor.name: tensor for tensor in reader.tensors}
    checkpoint = GGUFCheckpoint(path, architecture, family, {}, {}, [], reader, raw)
    checkpoint.config = _hf_config(checkpoint, raw)
    checkpoint.generation_config = _generation_config(checkpoint)
    checkpoint.tensors = _tensor_infos(checkpoint, raw)
    return checkpoint


def _open_reader(path: str) -> GGUFReader:
    if not os.path.isfile(path):
        raise ModelNotFoundError(f"{path}: no such file")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != GGUF_MAGIC:
        raise CheckpointError(f"{path}: not a GGUF file (starts with {magic!r}, expected {GGUF_MAGIC!r})")
    try:
        return GGUFReader(path)
    except Exception as e:  # the reader signals a damaged file with assorted exception types
        raise CheckpointError(f"{path}: corrupt GGUF file ({type(e).__name__}: {e})") from e


def _f32(value: float) -> float:
    # GGUF stores float32: keep the shortest decimal that rounds to it (1e-05, not 9.999999747378752e-06).
    return float(str(np.float32(value)))


def _hf_shape(tensor: ReaderTensor) -> tuple[int, ...]:
    # GGUF lists dimensions innermost first; torch outermost first.
    return tuple(int(n) for n in reversed(tensor.shape.tolist()))


def _hf_config(ckpt: GGUFCheckpoint, raw: dict[str, ReaderTensor]) -> dict[str, Any]:
    arch, family = ckpt.architecture, ckpt.family

    def need(key: str) -> Any:
        value = ckpt.metadata(f"{arch}.{key}")
        if value is None:
            raise CheckpointError(f"{ckpt.path}: metadata key {arch}.{key} is missing")
        return value

    for name in ("token_embd.weight", "blk.0.attn_q.weight"):
        if name not in raw:
            raise CheckpointError(f"{ckpt.path}: tensor {name} is missing")
    heads, hidden = int(need("attention.head_count")), int(need("embedding_length"))
    head_dim = ckpt.metadata(f"{arch}.attention.key_length") or _hf_shape(raw["blk.0.attn_q.weight"])[0] // heads
    bos, eos = ckpt.metadata("tokenizer.ggml.bos_token_id"), ckpt.metadata("tokenizer.ggml.eos_token_id")
    theta = _f32(ckpt.metadata(f"{arch}.rope.freq_base", 10000.0))
    config: dict[str, Any] = {
        "architectures": [family.hf_architecture],
        "model_type": family.model_type,
        "vocab_size": _hf_shape(raw["token_embd.weight"])[0],
        "hidden_size": hidden,
        "intermediate_size": int(need("feed_forward_length")),
        "num_hidden_layers": int(need("block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(ckpt.metadata(f"{arch}.attention.head_count_kv") or heads),
        "head_dim": int(head_dim),
        "hidden_act": "gelu_pytorch_tanh" if arch == "gemma3" else "silu",
        "max_position_embeddings": int(need("context_length")),
        "rms_norm_eps": _f32(need("attention.layer_norm_rms_epsilon")),
        "rope_theta": theta,
        "rope_scaling": _rope_scaling(ckpt, raw, theta, int(head_dim)),
        "attention_bias": "blk.0.attn_q.bias" in raw,
        "tie_word_embeddings": "output.weight" not in raw,
        "bos_token_id": bos,
        "eos_token_id": eos,
        "pad_token_id": ckpt.metadata("tokenizer.ggml.padding_token_id"),
        "dtype": "float32",
    }
    if family.model_type in ("llama", "mistral"):
        config["mlp_bias"] = "blk.0.ffn_up.bias" in raw
    if family.model_type == "mistral":
        config["sliding_window"] = None
    if family.model_type in ("qwen2", "qwen3"):
        config["use_sliding_window"] = False
    if arch == "gemma3":
        config.update(_gemma3_config(ckpt, config))
    return config


def _rope_scaling(
    ckpt: GGUFCheckpoint, raw: dict[str, ReaderTensor], theta: float, head_dim: int
) -> dict[str, Any] | None:
    arch = ckpt.architecture
    if "rope_freqs.weight" in raw:
        return _llama3_rope_scaling(ckpt, raw["rope_freqs.weight"], theta, head_dim)
    kind = ckpt.metadata(f"{arch}.rope.scaling.type", "none")
    factor = ckpt.metadata(f"{arch}.rope.scaling.factor")
    if kind == "none" or not factor or factor == 1.0:
        return None
    if kind == "linear":
        return {"rope_type": "linear", "factor": _f32(factor)}
    if kind == "yarn":
        scaling = {"rope_type": "yarn", "factor": _f32(factor)}
        original = ckpt.metadata(f"{arch}.rope.scaling.original_context_length")
        if original:
            scaling["original_max_position_embeddings"] = int(original)
        return scaling
    raise CheckpointError(f"{ckpt.path}: rope scaling type {kind!r} is not supported")


def _llama3_rope_factors(theta: float, head_dim: int, scaling: dict[str, Any]) -> np.ndarray:
    """What each rotary frequency is divided by under Llama 3's rope scaling."""
    wavelength = 2 * np.pi * theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    original, low, high = (
        scaling["original_max_position_embeddings"],
        scaling["low_freq_factor"],
        scaling["high_freq_factor"],
    )
    smooth = (original / wavelength - low) / (high - low)
    factors = 1 / ((1 - smooth) / scaling["factor"] + smooth)
    factors = np.where(wavelength < original / high, 1.0, factors)
    return np.where(wavelength > original / low, scaling["factor"], factors)


def _llama3_rope_scaling(ckpt: GGUFCheckpoint, tensor: ReaderTensor, theta: float, head_dim: int) -> dict[str, Any]:
    """Llama 3's rope scaling, which llama.cpp stores only as per-frequency factors (rope_freqs.weight).

    The file keeps the factors, not the parameters that produced them: take Llama 3's published ones and
    accept them only if they reproduce the stored factors.
    """
    stored = dequantize(tensor.data, tensor.tensor_type).astype(np.float64).reshape(-1)
    scaling = {
        "rope_type": "llama3",
        "factor": round(float(stored.max()), 4),
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    }
    if stored.shape != (head_dim // 2,) or not np.allclose(
        _llama3_rope_factors(theta, head_dim, scaling), stored, rtol=1e-4
    ):
        raise CheckpointError(
            f"{ckpt.path}: rope_freqs.weight does not match Llama 3 rope scaling (factor {scaling['factor']}, "
            "low/high frequency factors 1/4, original context 8192); other per-frequency factors are not supported"
        )
    return scaling


def _gemma3_config(ckpt: GGUFCheckpoint, config: dict[str, Any]) -> dict[str, Any]:
    window = ckpt.metadata("gemma3.attention.sliding_window")
    # Gemma 3 alternates five sliding-window layers with one global layer; the file does not restate it.
    layer_types = [
        "full_attention" if (i + 1) % 6 == 0 else "sliding_attention" for i in range(config["num_hidden_layers"])
    ]
    return {
        "hidden_activation": config["hidden_act"],
        "sliding_window": int(window) if window else None,
        "layer_types": layer_types,
        # llama.cpp's rule: only the 27B model (62 layers) scales queries by hidden / heads instead of head_dim.
        "query_pre_attn_scalar": (
            config["hidden_size"] // config["num_attention_heads"]
            if config["num_hidden_layers"] == 62
            else config["head_dim"]
        ),
        "rope_local_base_freq": 10000.0,
        "final_logit_softcapping": None,
        "attn_logit_softcapping": None,
    }


def _generation_config(ckpt: GGUFCheckpoint) -> dict[str, Any]:
    eos = [ckpt.config["eos_token_id"]] if ckpt.config["eos_token_id"] is not None else []
    # llama.cpp also stops at end-of-turn tokens that the metadata names separately.
    for key in ("tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id"):
        token = ckpt.metadata(key)
        if token is not None and token not in eos:
            eos.append(token)
    generation = {"bos_token_id": ckpt.config["bos_token_id"], "eos_token_id": eos[0] if len(eos) == 1 else eos}
    if ckpt.config["pad_token_id"] is not None:
        generation["pad_token_id"] = ckpt.config["pad_token_id"]
    return {key: value for key, value in generation.items() if value not in (None, [])}


def _tensor_infos(ckpt: GGUFCheckpoint, raw: dict[str, ReaderTensor]) -> list[TensorInfo]:
    """Map every tensor to its transformers name, checking type and shape; check nothing required is missing."""
    expected = _expected_shapes(ckpt.config)
    modules = {**LAYER_MODULES, **ckpt.family.renames}
    infos = []
    for tensor in raw.values():
        gguf_name = tensor.name
        if gguf_name == "rope_freqs.weight":
            continue  # folded into config["rope_scaling"]
        if tensor.tensor_type not in SUPPORTED_TYPES:
            supported = ", ".join(sorted(t.name for t in SUPPORTED_TYPES))
            raise CheckpointError(
                f"{ckpt.path}: tensor {gguf_name} has unsupported type {tensor.tensor_type.name} "
                f"(supported: {supported})"
            )
        parts = gguf_name.split(".")
        if parts[0] == "blk" and len(parts) == 4 and parts[2] in modules:
            module = f"model.layers.{parts[1]}.{modules[parts[2]]}"
            key = modules[parts[2]]
        elif len(parts) == 2 and parts[0] in GLOBAL_MODULES:
            module = key = GLOBAL_MODULES[parts[0]]
        else:
            raise CheckpointError(f"{ckpt.path}: unexpected tensor {gguf_name} for a {ckpt.architecture} model")
        shape = _hf_shape(tensor)
        want = expected[key] if parts[-1] == "weight" else expected[key][:1]
        if shape != want:
            raise CheckpointError(f"{ckpt.path}: tensor {gguf_name} has shape {list(shape)}, expected {list(want)}")
        infos.append(TensorInfo(gguf_name, f"{module}.{parts[-1]}", shape, tensor.tensor_type))
    required = ["token_embd.weight", "output_norm.weight"]
    required += [
        f"blk.{i}.{t}.weight" for i in range(ckpt.config["num_hidden_layers"]) for t in ckpt.family.layer_tensors
    ]
    for name in required:
        if name not in raw:
            raise CheckpointError(f"{ckpt.path}: tensor {name} is missing")
    return infos


def _expected_shapes(config: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    hidden, inter, head_dim = config["hidden_size"], config["intermediate_size"], config["head_dim"]
    q, kv = config["num_attention_heads"] * head_dim, config["num_key_value_heads"] * head_dim
    shapes = {
        "model.embed_tokens": (config["vocab_size"], hidden),
        "lm_head": (config["vocab_size"], hidden),
        "self_attn.q_proj": (q, hidden),
        "self_attn.k_proj": (kv, hidden),
        "self_attn.v_proj": (kv, hidden),
        "self_attn.o_proj": (hidden, q),
        "self_attn.q_norm": (head_dim,),
        "self_attn.k_norm": (head_dim,),
        "mlp.gate_proj": (inter, hidden),
        "mlp.up_proj": (inter, hidden),
        "mlp.down_proj": (hidden, inter),
    }
    norms = (
        "model.norm",
        "input_layernorm",
        "post_attention_layernorm",
        "pre_feedforward_layernorm",
        "post_feedforward_layernorm",
    )
    return shapes | {name: (hidden,) for name in norms}


def _undo_rotary_interleave(weight: np.ndarray, heads: int) -> np.ndarray:
    """Invert llama.cpp's q/k row order: within each head it interleaves the two rotary halves.

    llama.cpp stores row 2j + k of a head where transformers keeps row k * head_dim / 2 + j.
    """
    return weight.reshape(heads, -1, 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)
