"""YAML recipes: a scheme plus ordered stages, e.g.

    scheme: W8A8
    options: {}                 # fields of the scheme's config (group_size, symmetric, granularity, ...)
    ignore: [lm_head]
    kv_cache: fp8               # or int8, fp8-tensor, int8-tensor
    kv_cache_skip_layers: 0,1,4 # layers the engine keeps in full precision, or auto:N (optional)
    calibration: {source: generic, num_samples: 128, seq_len: 512}
    stages:
      - rotate: {kind: hadamard}  # optional, first: rotations folded into the weights
      - smoothquant: {alpha: 0.8}
      - gptq: {damping: 0.01, actorder: true}

Stages run per decoder layer in the order given: an optional rotation of the whole model first, at most one
balancing stage (smoothquant), then one weight stage (rtn, gptq, awq or hqq; rtn when none is given)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from slimserve.compress.configs import (
    AWQOptions,
    GPTQOptions,
    QuantConfig,
    SmoothQuantOptions,
    kv_cache_preset,
    preset,
)
from slimserve.compress.errors import QuantConfigError, RecipeError
from slimserve.compress.quant.hqq import HQQOptions
from slimserve.compress.rotation import RotationConfig

WEIGHT_STAGES = {"rtn": None, "gptq": GPTQOptions, "awq": AWQOptions, "hqq": HQQOptions}
TOP_LEVEL = {"scheme", "options", "ignore", "kv_cache", "kv_cache_skip_layers", "calibration", "stages"}


@dataclass
class CalibrationSpec:
    source: str = "generic"  # "generic" (the shipped corpus), "self" (model-written) or a text file path
    num_samples: int = 128
    seq_len: int = 512
    seed: int = 0


@dataclass
class Recipe:
    config: QuantConfig
    calibration: CalibrationSpec = field(default_factory=CalibrationSpec)


def _options(cls: type, values: Any, where: str) -> Any:
    if values is None:
        values = {}
    if not isinstance(values, dict):
        raise RecipeError(f"{where}: expected a mapping of options, got {values!r}")
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise RecipeError(f"{where}: unknown option(s) {', '.join(unknown)}; known: {', '.join(sorted(names))}")
    return cls(**values)


def parse_recipe(data: Any, where: str = "recipe") -> Recipe:
    if not isinstance(data, dict) or "scheme" not in data:
        raise RecipeError(f"{where}: a recipe is a mapping with at least a 'scheme' entry")
    unknown = sorted(set(data) - TOP_LEVEL)
    if unknown:
        raise RecipeError(f"{where}: unknown entries {', '.join(unknown)}; known: {', '.join(sorted(TOP_LEVEL))}")
    overrides: dict[str, Any] = dict(data.get("options") or {})
    if "ignore" in data:
        overrides["ignore"] = tuple(data["ignore"])
    skip = data.get("kv_cache_skip_layers")
    if skip is not None and not data.get("kv_cache"):
        raise RecipeError(f"{where}: kv_cache_skip_layers needs a kv_cache entry")
    if data.get("kv_cache"):
        skip_text = ",".join(map(str, skip)) if isinstance(skip, list) else skip
        overrides["kv_cache"] = kv_cache_preset(str(data["kv_cache"]), None if skip is None else str(skip_text))
    method = None
    overrides.setdefault("smoothquant", None)
    for i, stage in enumerate(data.get("stages") or []):
        if not isinstance(stage, dict) or len(stage) != 1:
            raise RecipeError(f"{where}: stage {i + 1} must be a single 'name: {{options}}' entry")
        ((name, values),) = stage.items()
        if name == "rotate":
            if i != 0:
                raise RecipeError(f"{where}: rotate must be the first stage")
            overrides["rotation"] = _options(RotationConfig, values, f"{where}: rotate")
        elif name == "smoothquant":
            if method is not None:
                raise RecipeError(f"{where}: smoothquant must come before the {method} stage")
            overrides["smoothquant"] = _options(SmoothQuantOptions, values, f"{where}: smoothquant")
        elif name in WEIGHT_STAGES:
            if method is not None:
                raise RecipeError(f"{where}: only one weight stage (rtn, gptq, awq or hqq), got {method} and {name}")
            method = name
            if WEIGHT_STAGES[name] is not None:
                overrides[name] = _options(WEIGHT_STAGES[name], values, f"{where}: {name}")
        else:
            raise RecipeError(f"{where}: unknown stage {name!r}; known: rotate, smoothquant, rtn, gptq, awq, hqq")
    overrides["method"] = method or "rtn"
    try:
        config = preset(str(data["scheme"]), **overrides)
    except (QuantConfigError, TypeError) as e:
        raise RecipeError(f"{where}: {e}") from None
    calibration = _options(CalibrationSpec, data.get("calibration"), f"{where}: calibration")
    return Recipe(config, calibration)


def load_recipe(path: str | Path) -> Recipe:
    p = Path(path)
    if not p.is_file():
        raise RecipeError(f"{p}: recipe file not found")
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        raise RecipeError(f"{p}: not valid YAML ({str(e).splitlines()[0]})") from None
    return parse_recipe(data, str(p))
