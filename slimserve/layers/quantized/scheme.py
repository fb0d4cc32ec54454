"""Read config.json's `quantization_config` (compressed-tensors, GPTQ, AWQ, FP8) into one scheme per linear
layer, matched by its Hugging Face module name the way each format's own loader matches it."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from slimserve.errors import CheckpointError

FORMATS = ("compressed-tensors", "gptq", "awq", "fp8")
# Quantization at load of a full-precision checkpoint (EngineConfig.quantization, vLLM's --quantization): FP8
# weights per output channel with dynamic per-token FP8 activations, llm-compressor's FP8_DYNAMIC.
ONLINE_METHODS = ("fp8",)


@dataclass(frozen=True)
class ActScheme:
    """How a layer quantizes its input: FP8 or INT8, dynamic per token (or per group) or one static scale."""

    type: str  # "float" or "int"
    dynamic: bool
    group_size: int | None = None


@dataclass(frozen=True)
class LinearScheme:
    """One linear layer's weight format. `layout` picks the layer class: compressed-tensors (ct-int,
    ct-float), gptq, awq, fp8 (quant_method fp8)."""

    layout: str
    bits: int
    type: str  # "int" or "float"
    symmetric: bool = True
    strategy: str = "group"  # tensor, channel, group, block
    group_size: int | None = None
    block: tuple[int, int] | None = None
    act: ActScheme | None = None
    actorder: bool = False
    zero_plus_one: bool = False  # GPTQ v1 checkpoints store every zero point minus one
    packed: bool = False  # compressed-tensors pack-quantized (int32 words) rather than int8 `weight`
    online: bool = False  # the checkpoint holds full-precision weights, rounded to this scheme at load


def _matches(name: str, target: str) -> bool:
    """compressed-tensors' rule: "re:" targets are regexes matched at the start, others name a module (or a
    suffix of its dotted name); the class name Linear matches every linear layer."""
    if target.startswith("re:"):
        return re.match(target[3:], name) is not None
    return target == "Linear" or name == target or name.endswith("." + target)


def _match_rank(name: str, target: str) -> int | None:
    """How specifically `target` matches `name`: 0 by name, 1 by regex, 2 by class (Linear), None not at all."""
    if not _matches(name, target):
        return None
    return 2 if target == "Linear" else 1 if target.startswith("re:") else 0


def _ct_act(args: dict[str, Any] | None) -> ActScheme | None:
    if not args:
        return None
    if args.get("num_bits", 8) != 8:
        raise CheckpointError(f"activation quantization to {args['num_bits']} bits is not supported")
    strategy = args.get("strategy", "tensor")
    dynamic = bool(args.get("dynamic", False))
    if strategy not in ("token", "tensor", "group") or (strategy == "group" and not dynamic):
        raise CheckpointError(f"activation quantization {strategy!r} (dynamic={dynamic}) is not supported")
    return ActScheme(args.get("type", "int"), dynamic, args.get("group_size") if strategy == "group" else None)


def _ct_scheme(group: dict[str, Any], default_format: str | None) -> LinearScheme:
    w = group.get("weights") or {}
    fmt = group.get("format") or default_format
    bits, wtype = int(w.get("num_bits", 8)), w.get("type", "int")
    strategy = w.get("strategy", "tensor")
    act = _ct_act(group.get("input_activations"))
    if wtype == "float":
        if fmt not in ("float-quantized", "naive-quantized") or bits != 8:
            raise CheckpointError(f"compressed-tensors float weights in format {fmt!r} are not supported")
        if strategy not in ("tensor", "channel", "block"):
            raise CheckpointError(f"FP8 weight strategy {strategy!r} is not supported")
        block = tuple(w["block_structure"]) if strategy == "block" else None
        return LinearScheme("ct-float", 8, "float", True, strategy, None, block, act)
    if fmt not in ("pack-quantized", "int-quantized", "naive-quantized"):
        raise CheckpointError(f"compressed-tensors format {fmt!r} is not supported")
    if bits not in (2, 3, 4, 8) or strategy not in ("channel", "group", "tensor"):
        raise CheckpointError(f"integer weights of {bits} bits per {strategy!r} are not supported")
    if act is not None and bits not in (4, 8):
        raise CheckpointError(f"{bits}-bit weights with quantized activations are not supported (4 or 8 bits)")
    if fmt != "pack-quantized" and bits != 8:
        raise CheckpointError(f"{bits}-bit weights must be pack-quantized, not {fmt!r}")
    group_size = w.get("group_size") if strategy == "group" else None
    actorder = w.get("actorder") in ("group", "weight")
    return LinearScheme("ct-int", bits, "int", bool(w.get("symmetric", True)), strategy, group_size, None, act,
                        actorder, packed=fmt == "pack-quantized")  # fmt: skip


@dataclass
class QuantizationConfig:
    """The checkpoint's quantization, asked per Hugging Face module name."""

    method: str
    raw: dict[str, Any]

    @classmethod
    def from_model_config(cls, cfg: dict[str, Any]) -> QuantizationConfig | None:
        q = cfg.get("quantization_config")
        if not q:
            return None
        method = str(q.get("quant_method", "")).lower()
        if method not in FORMATS:
            raise CheckpointError(
                f"quantization method {method!r} is not supported; choose one of {', '.join(FORMATS)}"
            )
        if method == "compressed-tensors" and q.get("quantization_status") == "frozen":
            raise CheckpointError("compressed-tensors checkpoint is not compressed (quantization_status frozen)")
        return cls(method, q)

    @classmethod
    def for_model(cls, cfg: dict[str, Any], online: str | None = None) -> QuantizationConfig | None:
        """The checkpoint's quantization, or the one asked for at load (`online`) of an unquantized checkpoint."""
        stored = cls.from_model_config(cfg)
        if online is None:
            return stored
        if online not in ONLINE_METHODS:
            raise CheckpointError(f"quantization {online!r} is not supported; choose {', '.join(ONLINE_METHODS)}")
        if stored is not None:
            raise CheckpointError(f"checkpoint is already quantized ({stored.method}); drop quantization={online!r}")
        return cls(f"online-{online}", {})

    def _ignored(self, name: str) -> bool:
        q = self.raw
        ignore = q.get("ignore") or q.get("modules_to_not_convert") or q.get("ignored_layers") or []
        return any(_matches(name, t) and t != "Linear" for t in ignore)

    def _quantizes_head(self) -> bool:
        """Whether the output head may be quantized: compressed-tensors by its targets and ignore list (as vLLM
        reads them), GPTQ when its config says `lm_head: true` (GPTQModel); the other formats keep it dense."""
        if self.method == "compressed-tensors":
            return True
        return self.method == "gptq" and bool(self.raw.get("lm_head", False))

    def scheme(self, name: str) -> LinearScheme | None:
        """The scheme of the linear layer `name` (Hugging Face naming), None when it stays unquantized."""
        if (name.endswith("lm_head") and not self._quantizes_head()) or self._ignored(name):
            return None
        if self.method == "online-fp8":
            return LinearScheme("fp8", 8, "float", True, "channel", act=ActScheme("float", True), online=True)
        q = self.raw
        if self.method == "compressed-tensors":
            # A module named by a group (exactly, then by a regex) takes that group over one that targets its
            # class (compressed-tensors' precedence): e.g. 4-bit "Linear" with an 8-bit "lm_head".
            best: tuple[int, dict] | None = None
            for group in (q.get("config_groups") or {}).values():
                ranks = [_match_rank(name, t) for t in group.get("targets", [])]
                rank = min((r for r in ranks if r is not None), default=None)
                if rank is not None and (best is None or rank < best[0]):
                    best = (rank, group)
            return None if best is None else _ct_scheme(best[1], q.get("format"))
        if self.method == "fp8":
            block = q.get("weight_block_size")
            dynamic = q.get("activation_scheme", "dynamic") == "dynamic"
            if block:
                if not dynamic:
                    raise CheckpointError("block-wise FP8 needs dynamic activations")
                return LinearScheme(
                    "fp8", 8, "float", True, "block", None, tuple(block), ActScheme("float", True, block[1])
                )
            return LinearScheme("fp8", 8, "float", True, "tensor", act=ActScheme("float", dynamic))
        bits, group = int(q.get("bits", 4)), int(q.get("group_size", 128))
        if bits not in (4, 8):
            raise CheckpointError(f"{self.method} with {bits} bits is not supported (4 or 8)")
        strategy = "group" if group > 0 else "channel"
        group_size = group if group > 0 else None
        if self.method == "gptq":
            v1 = q.get("checkpoint_format", "gptq") == "gptq"
            return LinearScheme("gptq", bits, "int", bool(q.get("sym", True)), strategy, group_size,
                                actorder=bool(q.get("desc_act", False)), zero_plus_one=v1)  # fmt: skip
        if str(q.get("version", "gemm")).lower() != "gemm":
            raise CheckpointError(f"AWQ version {q.get('version')!r} is not supported (only the GEMM layout)")
        return LinearScheme("awq", bits, "int", not q.get("zero_point", True), strategy, group_size)

    def kv_cache_scheme(self) -> dict[str, Any] | None:
        return self.raw.get("kv_cache_scheme")
