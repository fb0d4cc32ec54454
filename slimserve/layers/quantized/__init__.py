"""Quantized linear layers, one class per checkpoint weight format, chosen from config.json's
quantization_config by `make_linear`."""

from __future__ import annotations

from slimserve.errors import CheckpointError
from slimserve.layers.quantized.awq import AWQLinear
from slimserve.layers.quantized.base import QuantLinearBase
from slimserve.layers.quantized.fp8 import Fp8Linear
from slimserve.layers.quantized.fp8_block import BlockFp8Linear
from slimserve.layers.quantized.gptq import GPTQLinear
from slimserve.layers.quantized.int8_act import Int8ActLinear
from slimserve.layers.quantized.int_weight import CompressedIntLinear
from slimserve.layers.quantized.scheme import LinearScheme, QuantizationConfig
from slimserve.layers.quantized.w4a8 import W4A8Linear

__all__ = ["QuantLinearBase", "QuantizationConfig", "layer_class", "make_quantized_linear"]


def layer_class(scheme: LinearScheme) -> type[QuantLinearBase]:
    if scheme.layout == "gptq":
        return GPTQLinear
    if scheme.layout == "awq":
        return AWQLinear
    if scheme.type == "float":
        return BlockFp8Linear if scheme.strategy == "block" else Fp8Linear
    if scheme.act is None:
        return CompressedIntLinear
    return W4A8Linear if scheme.act.type == "float" else Int8ActLinear


def make_quantized_linear(
    quant: QuantizationConfig | None, names: list[str], in_features: int, shard_sizes: list[int], bias: bool = False
) -> QuantLinearBase | None:
    """The layer for the Hugging Face modules `names` (one per output shard, fused in this order); None when
    the checkpoint keeps them in full precision."""
    if quant is None:
        return None
    schemes = {quant.scheme(name) for name in names}
    if len(schemes) > 1:
        raise CheckpointError(f"{', '.join(names)} are fused but quantized differently")
    scheme = schemes.pop()
    if scheme is None:
        return None
    return layer_class(scheme)(in_features, shard_sizes, bias, scheme)
