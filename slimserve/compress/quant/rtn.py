"""Round to nearest: each weight goes to the closest grid point of a scale set by its group's min/max."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from slimserve.compress.args import QuantArgs
from slimserve.compress.quant import observers, qdq


@dataclass
class QuantizedWeight:
    """Codes (int8 holding INT4/INT8 values, or FP8), scales in the storage dtype, optional zero points."""

    q: torch.Tensor
    scale: torch.Tensor
    zero_point: torch.Tensor | None

    def dequantize(self, args: QuantArgs) -> torch.Tensor:
        return qdq.dequantize(self.q, self.scale, self.zero_point, args)


def rtn(w: torch.Tensor, args: QuantArgs, dtype: torch.dtype, observer: str = "minmax") -> QuantizedWeight:
    scale, zp = qdq.qparams(*observers.weight_range(w, args, observer), args, dtype)
    return QuantizedWeight(qdq.quantize(w, scale, zp, args), scale, zp)
