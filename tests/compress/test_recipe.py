"""YAML recipes and scheme presets."""

import pytest

from slimserve.compress.configs import (
    Float8DynamicActivationFloat8Weight,
    Int4WeightOnly,
    Int8DynamicActivationInt8Weight,
    preset,
)
from slimserve.compress.errors import QuantConfigError, RecipeError
from slimserve.compress.recipe import load_recipe, parse_recipe


def test_smoothquant_then_gptq(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(
        "scheme: W8A8\n"
        "kv_cache: fp8\n"
        "ignore: [lm_head, re:.*layers\\.0\\..*]\n"
        "calibration: {source: self, num_samples: 16, seq_len: 256}\n"
        "stages:\n"
        "  - smoothquant: {alpha: 0.8}\n"
        "  - gptq: {damping: 0.05, actorder: false}\n"
    )
    recipe = load_recipe(path)
    cfg = recipe.config
    assert isinstance(cfg, Int8DynamicActivationInt8Weight)
    assert cfg.method == "gptq" and cfg.smoothquant.alpha == 0.8
    assert cfg.gptq.damping == 0.05 and not cfg.gptq.actorder
    assert cfg.kv_cache.type == "float" and cfg.ignore == ("lm_head", "re:.*layers\\.0\\..*")
    assert recipe.calibration.source == "self" and recipe.calibration.num_samples == 16


def test_scheme_options_and_default_stage():
    recipe = parse_recipe({"scheme": "w4a16", "options": {"group_size": 64, "symmetric": False}})
    assert isinstance(recipe.config, Int4WeightOnly)
    assert recipe.config.method == "rtn" and recipe.config.weight_args().group_size == 64


@pytest.mark.parametrize(
    "data",
    [
        {"stages": []},
        {"scheme": "W4A16", "bogus": 1},
        {"scheme": "W4A16", "stages": [{"gptq": {}}, {"awq": {}}]},
        {"scheme": "W8A8", "stages": [{"gptq": {}}, {"smoothquant": {}}]},
        {"scheme": "W4A16", "stages": [{"prune": {}}]},
        {"scheme": "W4A16", "stages": [{"gptq": {"dampening": 0.1}}]},
        {"scheme": "W4A16", "options": {"granularity": "block"}},
        {"scheme": "NF4"},
        {"scheme": "FP8", "stages": [{"awq": {}}]},
        {"scheme": "FP8_BLOCK", "stages": [{"gptq": {}}]},
        {"scheme": "W4A16", "calibration": {"samples": 3}},
    ],
)
def test_bad_recipes(data):
    with pytest.raises(RecipeError):
        parse_recipe(data)


def test_unreadable_recipe(tmp_path):
    with pytest.raises(RecipeError):
        load_recipe(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("scheme: [W4A16\n")
    with pytest.raises(RecipeError):
        load_recipe(bad)


def test_presets():
    assert preset("FP8_BLOCK").weight_args().block_structure == (128, 128)
    assert isinstance(preset("fp8_dynamic"), Float8DynamicActivationFloat8Weight)
    assert preset("W4A8").format == "pack-quantized" and preset("W8A8").format == "int-quantized"
    assert preset("FP8_STATIC").needs_calibration and not preset("FP8").needs_calibration
    for bad in [dict(group_size=48), dict(method="sparsegpt"), dict(nonsense=1)]:
        with pytest.raises(QuantConfigError):
            preset("W4A16", **bad)
    with pytest.raises(QuantConfigError):
        preset("W4A16_NF")
