"""What to prune and how: `SparsityConfig(method="wanda", structure="2:4")`, in the style of the quantization
configs, with the compressed-tensors `sparsity_config` it writes."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from slimserve.compress.configs import DEFAULT_IGNORE, QuantConfig
from slimserve.compress.errors import QuantConfigError

PRUNE_METHODS = ("magnitude", "wanda", "sparsegpt")


@dataclass
class SparsityConfig:
    """Unstructured (`sparsity` of every row's weights zeroed) or N:M (`structure="2:4"`: 2 of every 4
    consecutive input weights zeroed, the pattern sparse tensor cores run).

    `quant` (SparseGPT only, symmetric integer weight-only schemes) quantizes the surviving weights in the
    same pass, so that each weight's rounding error is compensated like a pruned one (joint SparseGPT)."""

    method: str = "sparsegpt"
    sparsity: float = 0.5
    structure: str = "unstructured"
    ignore: tuple[str, ...] = DEFAULT_IGNORE
    block_size: int = 128  # SparseGPT columns per lazy-update block
    damping: float = 0.01  # SparseGPT: fraction of the mean Hessian diagonal added to it
    quant: QuantConfig | None = None

    def __post_init__(self) -> None:
        self.ignore = tuple(self.ignore)
        if self.method not in PRUNE_METHODS:
            raise QuantConfigError(f"unknown pruning method {self.method!r}; choose one of {', '.join(PRUNE_METHODS)}")
        if self.structure != "unstructured":
            n, m = self.n_m
            self.sparsity = n / m
        if not 0.0 < self.sparsity < 1.0:
            raise QuantConfigError(f"sparsity must be between 0 and 1, not {self.sparsity}")
        if self.quant is not None:
            w, a = self.quant.weight_args(), self.quant.input_args()
            if self.method != "sparsegpt":
                raise QuantConfigError("joint pruning and quantization needs method 'sparsegpt'")
            if w.type != "int" or not w.symmetric or a is not None or w.strategy not in ("channel", "group"):
                raise QuantConfigError("SparseGPT quantizes symmetric integer weight-only schemes (W4A16, W8A16)")

    @property
    def n_m(self) -> tuple[int, int]:
        """(zeros, group width) of an N:M structure."""
        try:
            n, m = (int(v) for v in self.structure.split(":"))
        except ValueError:
            raise QuantConfigError(
                f"structure must be 'unstructured' or N:M like '2:4', not {self.structure!r}"
            ) from None
        if not 0 < n < m:
            raise QuantConfigError(f"structure {self.structure}: need 0 < zeros < group width")
        return n, m

    @property
    def needs_calibration(self) -> bool:
        return self.method != "magnitude"

    def describe(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "sparsity": self.sparsity,
            "structure": self.structure,
            "quant": None if self.quant is None else self.quant.describe(),
            "ignore": list(self.ignore),
        }

    def sparsity_config(self, targets: list[str], ignore: list[str], global_sparsity: float) -> dict[str, Any]:
        """The compressed-tensors `sparsity_config`: weights are stored dense, zeros included."""
        return {
            "format": "dense",
            "global_sparsity": global_sparsity,
            "sparsity_structure": self.structure,
            "targets": targets,
            "ignore": ignore,
            "registry_requires_subclass": False,
        }
