"""Training-free quantization of Hugging Face causal LMs into compressed-tensors checkpoints.

from slimserve.compress import quantize_, Int4WeightOnly, save_compressed
report = quantize_(model, Int4WeightOnly(group_size=128, method="gptq"), calibration=samples)
save_compressed(model, config, "out/")
"""

from slimserve.compress.api import Calibration, quantize_
from slimserve.compress.configs import (
    PRESETS,
    AWQOptions,
    Float8DynamicActivationFloat8Weight,
    Float8StaticActivationFloat8Weight,
    Float8WeightOnly,
    GPTQOptions,
    Int4WeightFloat8Activation,
    Int4WeightOnly,
    Int8DynamicActivationInt8Weight,
    Int8WeightOnly,
    KVCacheConfig,
    QuantConfig,
    SmoothQuantOptions,
    preset,
)
from slimserve.compress.modules import QuantizedLinear
from slimserve.compress.recipe import Recipe, load_recipe
from slimserve.compress.writer import save_compressed

__all__ = [
    "AWQOptions",
    "Calibration",
    "Float8DynamicActivationFloat8Weight",
    "Float8StaticActivationFloat8Weight",
    "Float8WeightOnly",
    "GPTQOptions",
    "Int4WeightFloat8Activation",
    "Int4WeightOnly",
    "Int8DynamicActivationInt8Weight",
    "Int8WeightOnly",
    "KVCacheConfig",
    "PRESETS",
    "QuantConfig",
    "QuantizedLinear",
    "Recipe",
    "SmoothQuantOptions",
    "load_recipe",
    "preset",
    "quantize_",
    "save_compressed",
]
