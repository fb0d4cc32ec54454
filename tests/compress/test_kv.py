"""KV-cache quantization: per-head static scales, and a cache that holds values on the grid."""

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import DynamicCache

from slimserve.compress import Calibration, KVCacheConfig, preset, quantize_, save_compressed
from slimserve.compress.quant import kv

from .conftest import samples, tiny_model


@pytest.mark.parametrize("kind", ["int", "float"])
def test_cache_holds_quantized_keys_and_values(kind):
    model = tiny_model("llama")
    ids = samples(1, 24, seed=5)[0]
    with torch.no_grad():
        plain = model(ids).logits
    quantize_(model, preset("FP8", kv_cache=KVCacheConfig(kind)), Calibration(samples(), "test"), progress=False)
    attn = model.model.layers[1].self_attn
    assert attn.k_scale.shape == (2, 1, 1) and attn.v_scale.shape == (2, 1, 1)
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        logits = model(ids, cache=cache, use_cache=True).logits
    keys = cache.layers[1].keys / attn.k_scale
    values = cache.layers[1].values / attn.v_scale
    if kind == "int":
        assert torch.allclose(keys, keys.round(), atol=1e-3) and keys.abs().max() <= 128
        assert torch.allclose(values, values.round(), atol=1e-3)
    else:
        assert torch.allclose(keys, keys.to(torch.float8_e4m3fn).float(), rtol=1e-3, atol=1e-3)
    assert 0 < ((logits - plain).norm() / plain.norm()).item() < 0.5


def test_per_head_scales_follow_each_head():
    obs = kv.KVObserver()
    k = torch.ones(1, 2, 5, 4)
    k[:, 1] *= 8
    obs.add(k, k * 2)
    attn = torch.nn.Module()
    args = KVCacheConfig("float").args()
    kv.set_scales(attn, obs, args, torch.float32)
    assert torch.allclose(attn.k_scale.flatten(), torch.tensor([1.0, 8.0]) / 448)
    assert torch.allclose(attn.v_scale.flatten(), torch.tensor([2.0, 16.0]) / 448)


def test_checkpoint_records_kv_scheme(tmp_path):
    model = tiny_model("llama")
    config = preset("W4A16", group_size=64, kv_cache=KVCacheConfig("float"))
    quantize_(model, config, Calibration(samples(), "test"), progress=False)
    out = save_compressed(model, config, tmp_path / "q")
    q = json.loads((out / "config.json").read_text())["quantization_config"]
    assert q["kv_cache_scheme"]["strategy"] == "attn_head" and q["kv_cache_scheme"]["type"] == "float"
    tensors = load_file(out / "model.safetensors")
    assert tensors["model.layers.0.self_attn.k_scale"].shape == (2, 1, 1)
