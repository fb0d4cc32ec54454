"""How one tensor is quantized. The fields mirror compressed-tensors' QuantizationArgs so that a scheme
written to config.json reads back unchanged in `transformers`, vLLM and SGLang."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from slimserve.compress.errors import QuantConfigError

FP8_MAX = 448.0  # largest finite float8_e4m3fn value
STRATEGIES = ("tensor", "channel", "group", "block", "token", "attn_head")


@dataclass(frozen=True)
class QuantArgs:
    num_bits: int = 8
    type: str = "int"  # "int" or "float" (float means FP8 E4M3)
    symmetric: bool = True
    strategy: str = "channel"
    group_size: int | None = None
    block_structure: tuple[int, int] | None = None
    dynamic: bool = False
    # Ternary weights: 2-bit symmetric codes restricted to {-1, 0, 1} (stored and dequantized as 2-bit).
    ternary: bool = False

    def __post_init__(self) -> None:
        if self.type not in ("int", "float"):
            raise QuantConfigError(f"quantization type must be 'int' or 'float', not {self.type!r}")
        if self.type == "int" and self.num_bits not in (2, 3, 4, 8):
            raise QuantConfigError(f"integer quantization supports 2, 3, 4 or 8 bits, not {self.num_bits}")
        if self.ternary and (self.num_bits != 2 or not self.symmetric or self.type != "int"):
            raise QuantConfigError("ternary weights are 2-bit symmetric integers")
        if self.type == "float" and (self.num_bits != 8 or not self.symmetric):
            raise QuantConfigError("float quantization is FP8 E4M3: 8 bits, symmetric")
        if self.strategy not in STRATEGIES:
            raise QuantConfigError(f"unknown strategy {self.strategy!r}; choose one of {', '.join(STRATEGIES)}")
        if self.strategy == "group" and (self.group_size is None or self.group_size <= 0):
            raise QuantConfigError("strategy 'group' needs a positive group_size")
        if self.strategy != "group" and self.group_size is not None:
            raise QuantConfigError(f"group_size is only meaningful with strategy 'group', not {self.strategy!r}")
        if (self.strategy == "block") != (self.block_structure is not None):
            raise QuantConfigError("strategy 'block' and block_structure go together")
        if self.strategy == "token" and not self.dynamic:
            raise QuantConfigError("per-token quantization is always dynamic")

    @property
    def qmin(self) -> float:
        if self.ternary:
            return -1.0
        return -FP8_MAX if self.type == "float" else float(-(2 ** (self.num_bits - 1)))

    @property
    def qmax(self) -> float:
        return FP8_MAX if self.type == "float" else float(2 ** (self.num_bits - 1) - 1)

    def to_dict(self) -> dict[str, Any]:
        """The compressed-tensors JSON form."""
        out: dict[str, Any] = {
            "num_bits": self.num_bits,
            "type": self.type,
            "symmetric": self.symmetric,
            "strategy": self.strategy,
            "group_size": self.group_size,
            "dynamic": self.dynamic,
            "observer": None if self.dynamic else "minmax",
            "observer_kwargs": {},
            "actorder": None,
        }
        if self.block_structure is not None:
            out["block_structure"] = list(self.block_structure)
        return out
