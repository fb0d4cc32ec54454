"""Hugging Face folder -> GGUF file (llama.cpp's format) for the edge runtimes: llama.cpp, Ollama, LM Studio.

Tensors get llama.cpp's names and layouts (q/k rows of Llama-family models interleaved per rotary pair, as
llama.cpp's converter writes them); every 2-D weight is stored in the chosen type (like `llama-quantize
--pure`), 1-D tensors (norms, biases) in F32. The metadata carries the architecture's hyperparameters and the
tokenizer (byte-level BPE vocabulary, merges, token types, special tokens, chat template), so the file runs
with nothing beside it. It is written to a temporary name and renamed once complete."""

from __future__ import annotations

import json
import os
import uuid
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np
import torch
from gguf import GGMLQuantizationType as Q
from safetensors import safe_open
from tqdm.auto import tqdm
from transformers import AutoTokenizer

from slimserve.checkpoint.gguf_reader import GLOBAL_MODULES, LAYER_MODULES
from slimserve.checkpoint.resolve import resolve_model
from slimserve.errors import CheckpointError, SlimserveError, UnsupportedArchitectureError

TYPES = {"f16": (Q.F16, gguf.LlamaFileType.MOSTLY_F16), "q8_0": (Q.Q8_0, gguf.LlamaFileType.MOSTLY_Q8_0)}
TYPES["q4_0"] = (Q.Q4_0, gguf.LlamaFileType.MOSTLY_Q4_0)
# transformers model_type -> (GGUF architecture, q/k rows interleaved per rotary pair)
ARCHITECTURES = {"llama": ("llama", True), "mistral": ("llama", True), "qwen2": ("qwen2", False)}
ARCHITECTURES["qwen3"] = ("qwen3", False)
# transformers module -> llama.cpp tensor name: the reader's maps, inverted.
_LAYER = {module: name for name, module in LAYER_MODULES.items()}
_GLOBAL = {module: name for name, module in GLOBAL_MODULES.items()}
# llama.cpp's token types
NORMAL, CONTROL, USER_DEFINED = 1, 3, 4


@dataclass
class WrittenTensor:
    """What went into the file for one tensor: its type and the exact bytes (or values) stored."""

    ggml_type: Q
    data: np.ndarray


def gguf_tensor_name(hf_name: str) -> str | None:
    module, _, kind = hf_name.rpartition(".")
    if module in _GLOBAL:
        return f"{_GLOBAL[module]}.{kind}"
    parts = module.split(".")
    if len(parts) >= 4 and parts[:2] == ["model", "layers"]:
        local = ".".join(parts[3:])
        if local in _LAYER:
            return f"blk.{parts[2]}.{_LAYER[local]}.{kind}"
    return None


def _interleave_rotary(w: np.ndarray, heads: int) -> np.ndarray:
    """transformers' q/k row order -> llama.cpp's: row k * head_dim / 2 + j of a head goes to row 2j + k."""
    return w.reshape(heads, 2, -1, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _pre_tokenizer(tokenizer_json: dict) -> str:
    """llama.cpp's name for the way the tokenizer splits text before its merges."""
    from slimserve.checkpoint.gguf_tokenizer import _LLAMA3_SPLIT, _QWEN2_SPLIT

    pre = tokenizer_json.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", [pre])
    kinds = [s.get("type") for s in steps]
    if kinds == ["ByteLevel"]:
        return "gpt2"
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits"):
        return "smollm"
    if kinds == ["Split", "ByteLevel"]:
        pattern = steps[0].get("pattern", {}).get("Regex")
        if pattern == _QWEN2_SPLIT:
            return "qwen2"
        if pattern == _LLAMA3_SPLIT:
            return "llama-bpe"
    raise CheckpointError(
        f"pre-tokenizer {kinds} has no llama.cpp name known here (byte-level BPE: gpt2, smollm, qwen2, llama-bpe)"
    )


def _add_tokenizer(writer: gguf.GGUFWriter, folder: Path) -> None:
    path = folder / "tokenizer.json"
    if not path.is_file():
        raise CheckpointError(f"{folder}: no tokenizer.json (GGUF files carry their tokenizer)")
    data = json.loads(path.read_text(encoding="utf-8"))
    model = data["model"]
    if model.get("type") != "BPE" or not isinstance(model.get("vocab"), dict):
        raise CheckpointError(f"{folder}: only byte-level BPE tokenizers export to GGUF, not {model.get('type')}")
    hf = AutoTokenizer.from_pretrained(folder)
    size = max([*model["vocab"].values(), *(t["id"] for t in data.get("added_tokens", []))]) + 1
    tokens = [f"[PAD{i}]" for i in range(size)]
    types = [USER_DEFINED] * size  # ids with no token are padding, as llama.cpp's converter writes them
    for token, index in model["vocab"].items():
        tokens[index], types[index] = token, NORMAL
    for added in data.get("added_tokens", []):
        tokens[added["id"]] = added["content"]
        types[added["id"]] = CONTROL if added.get("special") else USER_DEFINED
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(_pre_tokenizer(data))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    for key, token_id in (("bos", hf.bos_token_id), ("eos", hf.eos_token_id), ("unk", hf.unk_token_id)):
        if token_id is not None:
            getattr(writer, f"add_{key}_token_id")(token_id)
    if hf.pad_token_id is not None:
        writer.add_pad_token_id(hf.pad_token_id)
    probe = hf("a")["input_ids"]
    writer.add_add_bos_token(hf.bos_token_id is not None and bool(probe) and probe[0] == hf.bos_token_id)
    writer.add_add_eos_token(hf.eos_token_id is not None and bool(probe) and probe[-1] == hf.eos_token_id)
    if hf.chat_template:
        writer.add_chat_template(hf.chat_template)


def _add_hyperparameters(writer: gguf.GGUFWriter, cfg: dict, name: str, file_type: int) -> None:
    if cfg.get("rope_scaling"):
        raise UnsupportedArchitectureError(f"rope scaling {cfg['rope_scaling']} does not export to GGUF yet")
    heads = cfg["num_attention_heads"]
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // heads
    writer.add_name(name)
    writer.add_file_type(int(file_type))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_context_length(cfg["max_position_embeddings"])
    writer.add_embedding_length(cfg["hidden_size"])
    writer.add_block_count(cfg["num_hidden_layers"])
    writer.add_feed_forward_length(cfg["intermediate_size"])
    writer.add_head_count(heads)
    writer.add_head_count_kv(cfg.get("num_key_value_heads") or heads)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(float(cfg.get("rope_theta", 10000.0)))
    writer.add_layer_norm_rms_eps(float(cfg["rms_norm_eps"]))
    writer.add_vocab_size(cfg["vocab_size"])


def _tensors(folder: Path):
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{folder}: no *.safetensors weights")
    for file in files:
        with safe_open(file, "pt") as f:
            for key in f.keys():
                yield key, f.get_tensor(key)


def _encode(w: np.ndarray, qtype: Q) -> tuple[np.ndarray, Q]:
    if w.ndim == 1:
        return w.astype(np.float32), Q.F32
    if qtype == Q.F16:
        return w.astype(np.float16), Q.F16
    block = gguf.GGML_QUANT_SIZES[qtype][0]
    if w.shape[-1] % block:
        return w.astype(np.float16), Q.F16  # rows that do not split into whole blocks stay 16-bit
    return gguf.quants.quantize(w.astype(np.float32), qtype), qtype


def export_gguf(model: str, out: str | os.PathLike, qtype: str = "q8_0", progress: bool = True) -> dict:
    """Write `model` (folder, .gguf or built-in name) as a GGUF file; returns what was written per tensor."""
    if qtype not in TYPES:
        raise SlimserveError(f"unknown GGUF type {qtype!r}; choose one of {', '.join(TYPES)}")
    target = Path(out)
    if target.exists():
        raise SlimserveError(f"{target}: already exists; choose a new output path")
    if not target.parent.is_dir():
        raise SlimserveError(f"{target.parent}: output folder does not exist")
    folder = Path(resolve_model(model))
    cfg = json.loads((folder / "config.json").read_text())
    if cfg.get("quantization_config"):
        raise CheckpointError(f"{folder}: export a floating-point model (this one is already quantized)")
    if cfg.get("model_type") not in ARCHITECTURES:
        raise UnsupportedArchitectureError(
            f"{folder}: model type {cfg.get('model_type')!r} does not export to GGUF (supported: "
            f"{', '.join(ARCHITECTURES)})"
        )
    arch, interleave = ARCHITECTURES[cfg["model_type"]]
    ggml_type, file_type = TYPES[qtype]
    tmp = target.parent / f".{target.name}.{uuid.uuid4().hex[:8]}.partial"
    written: dict[str, WrittenTensor] = {}
    writer = gguf.GGUFWriter(str(tmp), arch)
    try:
        _add_hyperparameters(writer, cfg, folder.name, file_type)
        _add_tokenizer(writer, folder)
        heads = {"attn_q": cfg["num_attention_heads"], "attn_k": cfg.get("num_key_value_heads")}
        tied = bool(cfg.get("tie_word_embeddings"))
        for hf_name, tensor in tqdm(list(_tensors(folder)), desc="exporting", disable=not progress):
            name = gguf_tensor_name(hf_name)
            if name is None:
                raise CheckpointError(f"{folder}: tensor {hf_name} has no GGUF name")
            if name == "output.weight" and tied:
                continue  # the tied head reads token_embd
            w = tensor.to(torch.float32).numpy()
            module = name.split(".")[-2]
            if interleave and module in heads:
                w = _interleave_rotary(w, heads[module] or cfg["num_attention_heads"])
            data, kind = _encode(w, ggml_type)
            written[name] = WrittenTensor(kind, data)
            writer.add_tensor(name, data, raw_dtype=kind if kind not in (Q.F32, Q.F16) else None)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file(progress=False)
        writer.close()
        os.rename(tmp, target)
    except BaseException:
        writer.close()
        tmp.unlink(missing_ok=True)
        raise
    return written
