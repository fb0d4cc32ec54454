"""A quantized KV cache with some layers kept in the model's dtype: the block plan counts each layer's bytes,
so the mixed cache fits more tokens than the full-precision one and fewer than the all-FP8 one; bad layer
indices fail with one line."""

import pytest
import torch

import slimserve.engine.runner as runner_module
from slimserve import LLM
from slimserve.cli import build_parser, engine_kwargs
from slimserve.config import EngineConfig
from slimserve.errors import SlimserveError

BUDGET = 1 << 20  # the CPU's KV-cache budget, small enough to bind before max_num_seqs full sequences


def engine(folder: str, **kwargs) -> LLM:
    return LLM(folder, dtype="float32", device="cpu", load_format="dummy", **kwargs)


def test_block_plan_counts_each_layers_bytes(llama_folder, monkeypatch):
    monkeypatch.setattr(runner_module, "CPU_KV_CACHE_BYTES", BUDGET)
    runners = {
        "float32": engine(llama_folder).engine.runner,
        "mixed": engine(llama_folder, kv_cache_dtype="fp8", kv_cache_skip_layers="1").engine.runner,
        "fp8": engine(llama_folder, kv_cache_dtype="fp8").engine.runner,
    }
    cfg = runners["fp8"].model_config
    per_byte = 2 * cfg.num_key_value_heads * cfg.head_dim * runners["fp8"].block_size  # keys and values, one layer
    layer_bytes = {"float32": [4, 4], "mixed": [1, 4], "fp8": [1, 1]}  # element size of layers 0 and 1
    for name, runner in runners.items():
        assert runner.kv_bytes_per_block == per_byte * sum(layer_bytes[name])
        assert runner.num_blocks == BUDGET // runner.kv_bytes_per_block
        allocated = sum(t.numel() * t.element_size() for t in runner.kv_caches.values())
        assert allocated == runner.num_blocks * runner.kv_bytes_per_block
    assert runners["float32"].num_blocks < runners["mixed"].num_blocks < runners["fp8"].num_blocks
    attns = runners["mixed"].model.attention_layers()
    assert [a.k_cache.dtype for a in attns] == [torch.float8_e4m3fn, torch.float32]


def test_plan_line_names_the_full_precision_layers(llama_folder):
    llm = engine(llama_folder, kv_cache_dtype="fp8", kv_cache_skip_layers=[0], num_kv_blocks=8)
    assert "; fp8, layers 0 in float32); max_model_len" in llm.engine.kv_cache_plan
    assert "; fp8" not in engine(llama_folder, kv_cache_dtype="fp8", num_kv_blocks=8).engine.kv_cache_plan


BAD = [
    ("fp8", [0, 5], "kv_cache_skip_layers: no layer 5; the model's layers are 0-1"),
    ("fp8", [-1], "kv_cache_skip_layers must hold non-negative layer indices"),
    ("fp8", "0,x", "kv_cache_skip_layers: 'x' is not a layer index"),
    ("auto", [0], "kv_cache_skip_layers needs a quantized kv_cache_dtype"),
]


@pytest.mark.parametrize("kv_dtype,layers,message", BAD)
def test_bad_skip_layers_fail_with_one_line(llama_folder, kv_dtype, layers, message):
    with pytest.raises(SlimserveError, match=message) as error:
        engine(llama_folder, kv_cache_dtype=kv_dtype, kv_cache_skip_layers=layers)
    assert "\n" not in str(error.value)


def test_command_line_option():
    args = build_parser().parse_args(["serve", "m", "--kv-cache-dtype", "fp8", "--kv-cache-skip-layers", "0-2,4"])
    config = EngineConfig(model="m", **engine_kwargs(args))
    assert config.kv_cache_skip_layers == [0, 1, 2, 4]
