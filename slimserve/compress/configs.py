"""Scheme configs in the style of torchao (`quantize_(model, Int4WeightOnly(group_size=128, method="gptq"))`)
and the preset names of llm-compressor (W4A16, W8A8, FP8_DYNAMIC, ...)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from slimserve.compress.args import QuantArgs
from slimserve.compress.errors import QuantConfigError
from slimserve.compress.quant.hqq import HQQOptions
from slimserve.compress.quant.observers import OBSERVERS
from slimserve.compress.rotation import RotationConfig
from slimserve.config import check_layer_indices, parse_layer_list

# lm_head stays in full precision (it dominates the error for little memory) and MoE routers must keep their
# exact logits; names are matched as plain module-name suffixes or, with the "re:" prefix, as regexes.
DEFAULT_IGNORE: tuple[str, ...] = ("lm_head", "re:.*mlp\\.gate$", "re:.*router.*", "re:.*shared_expert_gate$")
METHODS = ("rtn", "gptq", "awq", "hqq")
DATA_FREE_METHODS = ("rtn", "hqq")


@dataclass
class GPTQOptions:
    block_size: int = 128
    damping: float = 0.01  # fraction of the mean Hessian diagonal added to the diagonal
    actorder: bool = True  # columns by descending Hessian diagonal; groups keep their original columns
    max_damping_retries: int = 8  # Cholesky failures multiply the damping by 10, this many times at most


@dataclass
class AWQOptions:
    grid: int = 20  # scale exponents alpha in [0, 1) tried per balance group
    duo_scaling: bool = True  # s = mean|x|^alpha / mean(|w| / group absmax)^(1 - alpha), as AutoAWQ does
    # Clipping each group's range after scaling (AutoAWQ's second step) lowers every layer's output error on its
    # own, yet raised the whole model's error on the real models measured (SmolLM2-135M, g64 asymmetric: Austen
    # held-out perplexity +21.0% with clipping, +17.1% without; KL 0.172 against 0.158), so it is off by default.
    clip: bool = False
    clip_grid: int = 20
    max_shrink: float = 0.5  # smallest clipping ratio tried
    max_tokens: int = 4096  # calibration tokens kept per layer to score the scales
    clip_tokens: int = 512
    objective: str = "layer"  # scales scored on the decoder layer's output ("layer") or the group's ("linear")

    def __post_init__(self) -> None:
        if self.objective not in ("layer", "linear"):
            raise QuantConfigError(f"AWQ objective {self.objective!r}: choose layer or linear")


@dataclass
class SmoothQuantOptions:
    alpha: float = 0.5  # migration strength: 0 keeps activations, 1 moves all range into the weights


@dataclass
class KVCacheConfig:
    """Static calibrated scales for the key and value cache, one per KV head (or one per tensor)."""

    type: str = "float"  # "float" (FP8 E4M3) or "int" (INT8)
    per_head: bool = True
    # Decoder layers whose cache the engine keeps in the model's dtype, recorded in a slimserve-only entry of
    # quantization_config. Their scales are still calibrated and written: readers that ignore the entry
    # (transformers, vLLM) quantize every layer's cache as before.
    skip_layers: tuple[int, ...] = ()
    # Instead: keep the N layers whose quantized cache alone moves the next-token distribution most on the
    # calibration data (KL divergence from the model with an unquantized cache, in the dtype it was loaded in:
    # fp32 on the CPU; one forward pass of the whole model per layer).
    auto_skip: int = 0
    # Calibration tokens the automatic choice scores the layers on (whole samples, at least one).
    sensitivity_tokens: int = 4096

    def __post_init__(self) -> None:
        self.skip_layers = tuple(check_layer_indices(list(self.skip_layers), "KV-cache skip layers"))
        if self.auto_skip < 0 or self.sensitivity_tokens < 1:
            raise QuantConfigError("auto_skip must be >= 0 and sensitivity_tokens positive")
        if self.auto_skip and self.skip_layers:
            raise QuantConfigError("give KV-cache skip layers by index or auto_skip, not both")

    def args(self) -> QuantArgs:
        return QuantArgs(8, self.type, True, "attn_head" if self.per_head else "tensor")


@dataclass
class QuantConfig:
    """Everything every scheme has: the algorithm, the skipped layers, the optional KV-cache scheme."""

    method: str = "rtn"
    ignore: tuple[str, ...] = DEFAULT_IGNORE
    kv_cache: KVCacheConfig | None = None
    smoothquant: SmoothQuantOptions | None = None
    gptq: GPTQOptions = field(default_factory=GPTQOptions)
    awq: AWQOptions = field(default_factory=AWQOptions)
    # MoE: run every expert on every calibration token for its statistics (outputs still follow the router),
    # so that no expert goes uncalibrated; by default experts see only the tokens routed to them.
    moe_calibrate_all_experts: bool = False
    hqq: HQQOptions = field(default_factory=HQQOptions)
    observer: str = "minmax"  # weight ranges: "minmax" or "mse" (searched clipping, for 2-3 bit and ternary)
    rotation: RotationConfig | None = None  # Hadamard rotations folded into the weights before quantizing

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise QuantConfigError(f"unknown method {self.method!r}; choose one of {', '.join(METHODS)}")
        if self.observer not in OBSERVERS:
            raise QuantConfigError(f"unknown observer {self.observer!r}; choose one of {', '.join(OBSERVERS)}")
        self.ignore = tuple(self.ignore)
        w = self.weight_args()
        if self.method == "hqq" and (w.symmetric or w.type != "int"):
            raise QuantConfigError("HQQ optimizes zero points: use asymmetric integer weights (symmetric=False)")
        if w.type == "float" and self.method not in ("rtn", "gptq"):
            raise QuantConfigError(f"FP8 weights take rtn or gptq; method {self.method!r} does not apply")
        if w.type == "float" and self.method == "gptq" and w.strategy == "block":
            raise QuantConfigError("GPTQ rounds FP8 weights with per-channel or per-tensor scales, not blocks")
        if self.method == "awq" and self.smoothquant is not None:
            raise QuantConfigError("AWQ already balances activations and weights; drop SmoothQuant")

    def weight_args(self) -> QuantArgs:
        raise NotImplementedError

    def input_args(self) -> QuantArgs | None:
        return None

    @property
    def format(self) -> str:
        """The compressed-tensors storage format of the quantized linear layers."""
        w, a = self.weight_args(), self.input_args()
        if w.type == "float":
            return "float-quantized"
        if a is not None and a.type == "int":
            return "int-quantized"
        return "pack-quantized"

    @property
    def needs_calibration(self) -> bool:
        a = self.input_args()
        return (
            self.method not in DATA_FREE_METHODS
            or self.smoothquant is not None
            or self.kv_cache is not None
            or (a is not None and not a.dynamic)
        )

    def describe(self) -> dict[str, Any]:
        a = self.input_args()
        return {
            "config": type(self).__name__,
            "method": self.method,
            "weights": self.weight_args().to_dict(),
            "input_activations": None if a is None else a.to_dict(),
            "format": self.format,
            "smoothquant": None if self.smoothquant is None else self.smoothquant.alpha,
            "kv_cache": None if self.kv_cache is None else self.kv_cache.args().to_dict(),
            "ignore": list(self.ignore),
            "moe_calibrate_all_experts": self.moe_calibrate_all_experts,
            "observer": self.observer,
            "awq": asdict(self.awq) if self.method == "awq" else None,
            "gptq": asdict(self.gptq) if self.method == "gptq" else None,
            "rotation": None if self.rotation is None else self.rotation.describe(),
        }


def _int_weights(bits: int, group_size: int | None, symmetric: bool, ternary: bool = False) -> QuantArgs:
    if group_size is not None and group_size not in (32, 64, 128):
        raise QuantConfigError(f"group size must be 32, 64 or 128 (or none for per-channel), not {group_size}")
    strategy = "channel" if group_size is None else "group"
    return QuantArgs(bits, "int", symmetric, strategy, group_size, ternary=ternary)


@dataclass
class Int4WeightOnly(QuantConfig):
    group_size: int | None = 128
    symmetric: bool = True

    def weight_args(self) -> QuantArgs:
        return _int_weights(4, self.group_size, self.symmetric)


@dataclass
class IntxWeightOnly(QuantConfig):
    """2-, 3-, 4- or 8-bit integer weights, by default asymmetric in groups of 64 with searched clipping: at
    2 and 3 bits a zero point and a clipped range are worth far more than their few bits per group."""

    bits: int = 2
    group_size: int | None = 64
    symmetric: bool = False
    observer: str = "mse"

    def weight_args(self) -> QuantArgs:
        if self.bits not in (2, 3, 4, 8):
            raise QuantConfigError(f"bits must be 2, 3, 4 or 8, not {self.bits}")
        return _int_weights(self.bits, self.group_size, self.symmetric)


@dataclass
class TernaryWeightOnly(QuantConfig):
    """Ternary weights {-1, 0, 1} times one scale per group (stored as 2-bit symmetric codes); the scale is
    searched (the absmax would round most weights to zero)."""

    group_size: int | None = 64
    observer: str = "mse"

    def weight_args(self) -> QuantArgs:
        return _int_weights(2, self.group_size, True, ternary=True)


@dataclass
class Int8WeightOnly(QuantConfig):
    group_size: int | None = None
    symmetric: bool = True

    def weight_args(self) -> QuantArgs:
        return _int_weights(8, self.group_size, self.symmetric)


@dataclass
class Int8DynamicActivationInt8Weight(QuantConfig):
    """W8A8 INT8: per-channel symmetric weights, dynamic per-token activations, SmoothQuant by default."""

    smoothquant: SmoothQuantOptions | None = field(default_factory=SmoothQuantOptions)

    def weight_args(self) -> QuantArgs:
        return QuantArgs(8, "int", True, "channel")

    def input_args(self) -> QuantArgs:
        return QuantArgs(8, "int", True, "token", dynamic=True)


@dataclass
class Float8DynamicActivationFloat8Weight(QuantConfig):
    """FP8 W8A8 with dynamic activations: per-channel weights with per-token activations, or DeepSeek-style
    128x128 weight blocks with per-token groups of 128 activations."""

    granularity: str = "channel"  # "channel" or "block"

    def weight_args(self) -> QuantArgs:
        if self.granularity == "channel":
            return QuantArgs(8, "float", True, "channel")
        if self.granularity == "block":
            return QuantArgs(8, "float", True, "block", block_structure=(128, 128))
        raise QuantConfigError(f"FP8 granularity must be 'channel' or 'block', not {self.granularity!r}")

    def input_args(self) -> QuantArgs:
        if self.granularity == "block":
            return QuantArgs(8, "float", True, "group", group_size=128, dynamic=True)
        return QuantArgs(8, "float", True, "token", dynamic=True)


@dataclass
class Float8StaticActivationFloat8Weight(QuantConfig):
    """FP8 W8A8 with one calibrated activation scale per layer (no per-token reductions at run time)."""

    weight_granularity: str = "channel"  # "channel" or "tensor"

    def weight_args(self) -> QuantArgs:
        if self.weight_granularity not in ("channel", "tensor"):
            raise QuantConfigError(f"weight granularity must be 'channel' or 'tensor', not {self.weight_granularity!r}")
        return QuantArgs(8, "float", True, self.weight_granularity)

    def input_args(self) -> QuantArgs:
        return QuantArgs(8, "float", True, "tensor")


@dataclass
class Float8WeightOnly(QuantConfig):
    """FP8 weights, activations left in the model's dtype (W8A16-FP8): half the weight bytes of bf16 with no
    rounding of activations; vLLM and slimserve dequantize inside their GEMMs."""

    weight_granularity: str = "channel"  # "channel" or "tensor"

    def weight_args(self) -> QuantArgs:
        if self.weight_granularity not in ("channel", "tensor"):
            raise QuantConfigError(f"weight granularity must be 'channel' or 'tensor', not {self.weight_granularity!r}")
        return QuantArgs(8, "float", True, self.weight_granularity)


@dataclass
class Int4WeightFloat8Activation(QuantConfig):
    """W4A8: INT4 group weights (packed) with dynamic per-token FP8 activations."""

    group_size: int | None = 128

    def weight_args(self) -> QuantArgs:
        return _int_weights(4, self.group_size, True)

    def input_args(self) -> QuantArgs:
        return QuantArgs(8, "float", True, "token", dynamic=True)


@dataclass
class Int4DynamicActivationInt4Weight(QuantConfig):
    """W4A4 (simulated): INT4 group weights with dynamic per-token INT4 activations; usable only with rotations
    that remove the activation outliers first."""

    group_size: int | None = 128

    def weight_args(self) -> QuantArgs:
        return _int_weights(4, self.group_size, True)

    def input_args(self) -> QuantArgs:
        return QuantArgs(4, "int", True, "token", dynamic=True)


# "FP8" follows the per-channel dynamic form (the one that needs no calibration); llm-compressor's static
# per-tensor FP8 is FP8_STATIC here. "W4A8" carries FP8 activations (llm-compressor's W4AFP8).
PRESETS: dict[str, tuple[type[QuantConfig], dict[str, Any]]] = {
    "W4A16": (Int4WeightOnly, {"group_size": 128}),
    "W4A16_ASYM": (Int4WeightOnly, {"group_size": 128, "symmetric": False}),
    "W8A16": (Int8WeightOnly, {"group_size": 128}),
    "W8A8": (Int8DynamicActivationInt8Weight, {}),
    "FP8": (Float8DynamicActivationFloat8Weight, {"granularity": "channel"}),
    "FP8_DYNAMIC": (Float8DynamicActivationFloat8Weight, {"granularity": "channel"}),
    "FP8_STATIC": (Float8StaticActivationFloat8Weight, {}),
    "FP8_BLOCK": (Float8DynamicActivationFloat8Weight, {"granularity": "block"}),
    "FP8_WEIGHT_ONLY": (Float8WeightOnly, {}),
    "W4A8": (Int4WeightFloat8Activation, {"group_size": 128}),
    "W4A4": (Int4DynamicActivationInt4Weight, {"group_size": 128}),
    "W3A16": (IntxWeightOnly, {"bits": 3, "group_size": 64}),
    "W2A16": (IntxWeightOnly, {"bits": 2, "group_size": 64}),
    "TERNARY": (TernaryWeightOnly, {"group_size": 64}),
}
# name -> (type, per_head): per-head scales by default; "-tensor" is one scale per layer (llm-compressor's default).
KV_CACHE_PRESETS: dict[str, tuple[str, bool]] = {
    "fp8": ("float", True),
    "int8": ("int", True),
    "fp8-tensor": ("float", False),
    "int8-tensor": ("int", False),
}


def preset(name: str, **overrides: Any) -> QuantConfig:
    """A preset by name, with dataclass fields overridden (method="gptq", group_size=64, kv_cache=..., ...)."""
    key = name.upper()
    if key not in PRESETS:
        raise QuantConfigError(f"unknown scheme {name!r}; choose one of {', '.join(PRESETS)}")
    cls, defaults = PRESETS[key]
    unknown = sorted(set(overrides) - set(cls.__dataclass_fields__))
    if unknown:
        raise QuantConfigError(f"scheme {key} has no option {', '.join(unknown)}")
    return cls(**{**defaults, **overrides})


def kv_cache_preset(name: str, skip_layers: str | None = None) -> KVCacheConfig:
    """A KV-cache preset; `skip_layers` as the command line takes it: indices ("0,1,4", "0-4,7") or "auto:N"."""
    if name.lower() not in KV_CACHE_PRESETS:
        raise QuantConfigError(f"unknown KV-cache scheme {name!r}; choose one of {', '.join(KV_CACHE_PRESETS)}")
    kind, per_head = KV_CACHE_PRESETS[name.lower()]
    if skip_layers is None:
        return KVCacheConfig(kind, per_head)
    count = skip_layers.strip().removeprefix("auto:")
    if count != skip_layers.strip():
        if not count.isdigit() or int(count) < 1:
            raise QuantConfigError(f"KV-cache skip layers {skip_layers!r}: auto:N takes a positive number of layers")
        return KVCacheConfig(kind, per_head, auto_skip=int(count))
    return KVCacheConfig(kind, per_head, tuple(parse_layer_list(skip_layers, "KV-cache skip layers")))
