"""Acceptance: every scheme's checkpoint loads in `transformers` (through compressed-tensors) and computes the
logits of our own fake-quantized model."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from slimserve.compress import Calibration, preset, quantize_, save_compressed
from slimserve.compress.errors import QuantConfigError
from slimserve.compress.loading import load_causal_lm
from slimserve.compress.modules import QuantizedLinear

from .conftest import samples, tiny_model

CASES = [
    ("W4A16", {}, "llama"),
    ("W4A16", {"method": "gptq", "group_size": 32}, "qwen2"),
    ("W4A16", {"method": "gptq", "group_size": None}, "llama"),
    ("W4A16_ASYM", {"method": "awq", "group_size": 64}, "qwen2"),
    ("W8A16", {"method": "gptq"}, "llama"),
    ("W8A8", {"method": "gptq"}, "qwen2"),
    ("W8A8", {}, "llama"),
    ("FP8", {}, "qwen2"),
    ("FP8", {"method": "gptq"}, "llama"),
    ("FP8_STATIC", {"method": "gptq"}, "qwen2"),
    ("FP8_STATIC", {}, "llama"),
    ("FP8_BLOCK", {}, "llama"),
    ("W4A8", {"method": "gptq"}, "qwen2"),
    ("W4A16", {"method": "awq", "group_size": 32}, "gemma3"),
    ("FP8_STATIC", {}, "gemma3"),
]


@pytest.mark.parametrize("scheme,options,family", CASES, ids=[f"{c[0]}-{c[2]}-{c[1]}" for c in CASES])
def test_checkpoint_matches_fake_quantized_model(tmp_path, scheme, options, family):
    model = tiny_model(family)
    config = preset(scheme, **options)
    report = quantize_(model, config, Calibration(samples(), "test"), progress=False)
    ids = samples(1, 40, seed=7)[0]
    with torch.no_grad():
        ours = model(ids).logits
    out = save_compressed(model, config, tmp_path / "q", report=report)

    cfg = json.loads((out / "config.json").read_text())["quantization_config"]
    assert cfg["format"] == config.format
    assert cfg["ignore"] == ["lm_head"]
    assert json.loads((out / "slimserve_report.json").read_text())["scheme"]["method"] == config.method

    loaded, _ = load_causal_lm(str(out))
    with torch.no_grad():
        theirs = loaded(ids).logits
    assert ((ours - theirs).norm() / ours.norm()).item() < 1e-3
    assert any(isinstance(m, QuantizedLinear) for m in model.modules())


def test_default_transformers_path_for_symmetric_weights(tmp_path):
    """Without slimserve's loader: plain from_pretrained, compressed until the first forward."""
    model = tiny_model("llama")
    config = preset("W4A16", group_size=64)
    quantize_(model, config, progress=False)
    ids = samples(1, 16, seed=3)[0]
    with torch.no_grad():
        ours = model(ids).logits
    out = save_compressed(model, config, tmp_path / "q")
    loaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    with torch.no_grad():
        assert torch.allclose(loaded(ids).logits, ours, rtol=1e-3, atol=1e-5)


def test_static_activations_refuse_a_quantized_lm_head():
    with pytest.raises(QuantConfigError, match="lm_head"):
        quantize_(tiny_model("llama"), preset("FP8_STATIC", ignore=()), Calibration(samples(), "t"), progress=False)


def test_quantized_lm_head_unties_the_embedding(tmp_path):
    model = tiny_model("llama")
    config = preset("W8A16", ignore=())
    report = quantize_(model, config, progress=False)
    assert report.skipped == [] and isinstance(model.lm_head, QuantizedLinear)
    ids = samples(1, 16, seed=2)[0]
    with torch.no_grad():
        ours = model(ids).logits
    out = save_compressed(model, config, tmp_path / "q")
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is False
    loaded, _ = load_causal_lm(str(out))
    with torch.no_grad():
        assert ((ours - loaded(ids).logits).norm() / ours.norm()).item() < 1e-3
