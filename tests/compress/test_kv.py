"""KV-cache quantization: per-head static scales, and a cache that holds values on the grid."""

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import DynamicCache

from slimserve.compress import Calibration, KVCacheConfig, preset, quantize_, save_compressed
from slimserve.compress.configs import kv_cache_preset
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


@pytest.mark.parametrize("kind", ["int", "float"])
@pytest.mark.parametrize("per_head", [True, False])
def test_calibrated_cache_matches_the_engine_cache(kind, per_head):
    """What the quality benchmark measures is what the engine serves: keys and values quantized on write with
    the calibrated scales (saturating past them) and dequantized on read, as the engine's reference kernels do."""
    from slimserve.kernels.attention_ref import dequantize_kv_ref, quantize_kv_ref

    args = KVCacheConfig(kind, per_head).args()
    obs = kv.KVObserver()
    gen = torch.Generator().manual_seed(3)
    k = torch.randn(1, 2, 16, 8, generator=gen) * torch.tensor([1.0, 30.0]).view(1, 2, 1, 1)
    obs.add(k[:, :, :8], k[:, :, :8] / 4)  # calibrated on half the tokens: the rest may saturate
    attn = torch.nn.Module()
    kv.set_scales(attn, obs, args, torch.float32)
    proxy = kv._CacheProxy(attn, None, args, None)
    fake_k, fake_v = proxy.update(k, k / 4)
    dtype = torch.float8_e4m3fn if kind == "float" else torch.int8
    for fake, x, scale in ((fake_k, k, attn.k_scale), (fake_v, k / 4, attn.v_scale)):
        head_scale = scale.reshape(-1).expand(2)
        tokens = x[0].transpose(0, 1)  # [tokens, kv heads, head_dim], the engine's layout
        served = dequantize_kv_ref(quantize_kv_ref(tokens, head_scale, dtype), head_scale)
        torch.testing.assert_close(fake[0].transpose(0, 1), served, rtol=0, atol=0)


def test_per_tensor_preset_writes_one_scale_per_layer(tmp_path):
    model = tiny_model("qwen2")
    config = preset("FP8", kv_cache=kv_cache_preset("fp8-tensor"))
    quantize_(model, config, Calibration(samples(), "test"), progress=False)
    attn = model.model.layers[0].self_attn
    assert attn.k_scale.shape == (1,) and attn.v_scale.shape == (1,)
    out = save_compressed(model, config, tmp_path / "q")
    q = json.loads((out / "config.json").read_text())["quantization_config"]
    assert q["kv_cache_scheme"]["strategy"] == "tensor"
    assert load_file(out / "model.safetensors")["model.layers.1.self_attn.v_scale"].shape == (1,)
