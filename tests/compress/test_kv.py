"""KV-cache quantization: per-head static scales, and a cache that holds values on the grid."""

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import DynamicCache

from slimserve.cli import build_parser
from slimserve.compress import Calibration, KVCacheConfig, preset, quantize_, save_compressed
from slimserve.compress.cli import build_recipe
from slimserve.compress.configs import kv_cache_preset
from slimserve.compress.errors import QuantConfigError
from slimserve.compress.quant import kv
from slimserve.compress.recipe import parse_recipe
from slimserve.errors import SlimserveError

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


def _keys_on_grid(keys: torch.Tensor, scale: torch.Tensor) -> bool:
    scaled = keys / scale
    return torch.allclose(scaled, scaled.to(torch.float8_e4m3fn).float(), rtol=1e-3, atol=1e-3)


def test_skipped_layers_stay_unrounded_and_are_recorded(tmp_path):
    """A skipped layer's cache is not rounded while the later layers calibrate (as the engine serves it), its
    scales are still written (other readers quantize every layer), and the list goes into a key only slimserve
    reads, and into the report."""
    model = tiny_model("llama")
    config = preset("W4A16", group_size=64, kv_cache=KVCacheConfig("float", skip_layers=(1,)))
    report = quantize_(model, config, Calibration(samples(), "test"), progress=False)
    assert report.kv_cache_skip_layers == [1] and report.kv_cache_layer_kl is None
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        model(samples(1, 24, seed=5)[0], cache=cache, use_cache=True)
    attns = [layer.self_attn for layer in model.model.layers]
    assert _keys_on_grid(cache.layers[0].keys, attns[0].k_scale)
    assert not _keys_on_grid(cache.layers[1].keys, attns[1].k_scale)
    out = save_compressed(model, config, tmp_path / "q", report=report)
    q = json.loads((out / "config.json").read_text())["quantization_config"]
    assert q["kv_cache_skip_layers"] == [1] and q["kv_cache_scheme"] == KVCacheConfig("float").args().to_dict()
    assert "model.layers.1.self_attn.k_scale" in load_file(out / "model.safetensors")
    assert json.loads((out / "slimserve_report.json").read_text())["kv_cache_skip_layers"] == [1]


def test_auto_skip_ranks_blown_up_keys_first(tmp_path):
    """auto:1 keeps the layer whose quantized cache alone costs the most KL divergence on the calibration data:
    the one whose keys a huge k_proj bias blows up. The bias sits in channel 15 of each head (head_dim 32), the
    pair of RoPE's slowest frequency, so it stays nearly constant over the positions and changes the unquantized
    model little; the per-head scale it sets rounds the head's other channels to zero in E4M3."""
    model = tiny_model("qwen2", num_hidden_layers=4)
    with torch.no_grad():
        model.model.layers[2].self_attn.k_proj.bias[15::32] = 1e6
    config = preset("FP8", kv_cache=kv_cache_preset("fp8", "auto:1"))
    report = quantize_(model, config, Calibration(samples(), "test"), progress=False)
    kl = report.kv_cache_layer_kl
    assert report.kv_cache_skip_layers == [2] and len(kl) == 4
    assert kl[2] > 2 * max(kl[:2] + kl[3:])
    out = save_compressed(model, config, tmp_path / "q", report=report)
    assert json.loads((out / "config.json").read_text())["quantization_config"]["kv_cache_skip_layers"] == [2]
    with pytest.raises(QuantConfigError, match="report"):
        save_compressed(model, config, tmp_path / "r")


def test_skip_layer_options():
    assert kv_cache_preset("fp8", "0-2,5").skip_layers == (0, 1, 2, 5)
    assert kv_cache_preset("int8", "auto:3").auto_skip == 3
    recipe = parse_recipe({"scheme": "FP8", "kv_cache": "fp8", "kv_cache_skip_layers": [4, 0]})
    assert recipe.config.kv_cache.skip_layers == (0, 4)
    for text, message in (("auto:0", "positive number"), ("auto:x", "positive number"), ("1,a", "'a' is not")):
        with pytest.raises(SlimserveError, match=message):
            kv_cache_preset("fp8", text)
    args = build_parser().parse_args(["compress", "m", "--out", "o", "--scheme", "FP8", "--kv-cache-skip-layers", "0"])
    with pytest.raises(QuantConfigError, match="needs --kv-cache"):
        build_recipe(args)


@pytest.mark.parametrize("kv_config,message", [
    (KVCacheConfig(skip_layers=(0, 7)), "no layer 7; the model's layers are 0-1"),
    (KVCacheConfig(auto_skip=2), "auto:2 leaves none of 2 layers quantized"),
])  # fmt: skip
def test_bad_skip_layers_fail_with_one_line(kv_config, message):
    with pytest.raises(QuantConfigError, match=message):
        quantize_(tiny_model("llama"), preset("FP8", kv_cache=kv_config), Calibration(samples(), "t"), progress=False)
