"""Pruned, structurally shrunk and GQA-converted models load in `transformers` and the engine's greedy
output equals `transformers`' token for token."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from slimserve.compress.loading import load_causal_lm
from slimserve.compress.prune import SparsityConfig, prune_, save_pruned
from slimserve.compress.prune.gqa import convert_gqa
from slimserve.compress.prune.importance import estimate_importance
from slimserve.compress.prune.rebuild import count_parameters, save_folder
from slimserve.compress.prune.structured import apply_structured, shape_for_target, shape_from_ratios
from slimserve.layers.sparse import is_24_sparse, sparse_structure
from tests.compress.conftest import samples, tiny_model
from tests.engine.test_exact_vs_transformers import check_engine, make_prompts, transformers_greedy
from tests.tiny_models import build_tiny_model

CPU = torch.device("cpu")


def calib(n: int = 4, length: int = 32) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    return [torch.randint(3, 512, (1, length), generator=g) for _ in range(n)]


@pytest.fixture(scope="module")
def mha_folder(tmp_path_factory) -> str:
    return build_tiny_model("llama2", str(tmp_path_factory.mktemp("llama2")))


def engine_matches_transformers(folder: str, **engine_kwargs) -> None:
    prompts = make_prompts(4)[:4]
    check_engine(folder, transformers_greedy(folder, prompts), prompts, **engine_kwargs)


@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_two_four_checkpoint_loads_and_engine_matches(tmp_path, mha_folder, method):
    model, tok = load_causal_lm(mha_folder)
    config = SparsityConfig(method, structure="2:4")
    report = prune_(model, config, calib(), device=CPU, progress=False)
    out = save_pruned(model, config, tmp_path / "p", tok, report)
    sparsity = json.loads((out / "config.json").read_text())["quantization_config"]["sparsity_config"]
    assert sparsity["sparsity_structure"] == "2:4" and sparsity["format"] == "dense"
    assert "lm_head" not in sparsity["targets"] and len(sparsity["targets"]) == 2 * 7
    assert sparse_structure(json.loads((out / "config.json").read_text())) == "2:4"
    loaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    for name in sparsity["targets"]:
        assert is_24_sparse(loaded.get_submodule(name).weight)
    ids = calib(1, 20)[0]
    with torch.no_grad():
        assert torch.allclose(loaded(ids).logits, model(ids).logits, atol=1e-5)
    # Sparse tensor cores exist on CUDA only: on the CPU the engine keeps the dense weights.
    engine_matches_transformers(str(out), sparse_kernels=True)


def test_structured_model_is_smaller_and_engine_matches(tmp_path, mha_folder):
    model, tok = load_causal_lm(mha_folder)
    importance = estimate_importance(model, calib(), CPU, progress=False)
    assert importance.heads.shape == (2, 4) and importance.mlp.shape == (2, 128) and importance.hidden.shape == (64,)
    shape = shape_from_ratios(model.config, mlp_ratio=0.5, hidden_ratio=0.5, heads=2, drop_layers=1)
    small = apply_structured(model, importance, shape)
    cfg = small.config
    assert (cfg.hidden_size, cfg.intermediate_size, cfg.num_attention_heads, cfg.num_hidden_layers) == (32, 64, 2, 1)
    assert cfg.head_dim == 16 and count_parameters(small) < count_parameters(model) / 2
    out = save_folder(small, tmp_path / "s", tok)
    engine_matches_transformers(str(out))


def test_structured_keeps_the_important_channels():
    """Channels that never activate are the ones removed; what is left computes the same function."""
    model = tiny_model("llama", num_hidden_layers=1)
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight[::2] = 0  # half the MLP channels output zero
    importance = estimate_importance(model, samples(2), CPU, progress=False)
    small = apply_structured(model, importance, shape_from_ratios(model.config, mlp_ratio=0.5))
    ids = samples(1, 16, seed=4)[0]
    with torch.no_grad():
        assert torch.allclose(small(ids).logits, model(ids).logits, atol=1e-5)


def test_target_params_shape(mha_folder):
    model, _ = load_causal_lm(mha_folder)
    target = int(count_parameters(model) * 0.75)
    importance = estimate_importance(model, calib(2), CPU, progress=False)
    small = apply_structured(model, importance, shape_for_target(model, target))
    assert 0.5 * target < count_parameters(small) <= target


@pytest.mark.parametrize("kv_heads", [2, 1])
def test_gqa_conversion_mean_pools_and_engine_matches(tmp_path, mha_folder, kv_heads):
    model, tok = load_causal_lm(mha_folder)
    converted = convert_gqa(model, kv_heads)
    assert converted.config.num_key_value_heads == kv_heads
    old = model.model.layers[0].self_attn.k_proj.weight.reshape(kv_heads, 4 // kv_heads, 16, 64)
    assert torch.allclose(converted.model.layers[0].self_attn.k_proj.weight, old.mean(1).reshape(-1, 64))
    out = save_folder(converted, tmp_path / "g", tok)
    engine_matches_transformers(str(out))


def test_config_built_model_checkpoint_names_its_architecture(tmp_path):
    from slimserve.config import ModelConfig

    model = tiny_model("qwen2")
    config = SparsityConfig("magnitude", structure="2:4")
    prune_(model, config, device=CPU, progress=False)
    out = save_pruned(model, config, tmp_path / "m")
    assert ModelConfig.from_folder(str(out)).architecture == "Qwen2ForCausalLM"


def test_sparse_swap_needs_cuda_half_precision_and_the_pattern():
    from torch import nn

    from slimserve.layers.linear import Linear
    from slimserve.layers.sparse import use_sparse_24

    model = nn.Module()
    model.proj = Linear(128, [64, 64])
    with torch.no_grad():
        model.proj.weight.copy_((torch.randn(128, 32, 4) * torch.tensor([1.0, 0, 1, 0])).reshape(128, 128))
    assert is_24_sparse(model.proj.weight) and not is_24_sparse(torch.ones(4, 8))
    assert use_sparse_24(model) == []  # on the CPU the dense weight stays
    assert type(model.proj.weight.data) is torch.Tensor


def test_sparse_layer_output_hook_gives_row_major_values():
    from slimserve.layers.sparse import _row_major_output

    out = torch.randn(64, 5).t()  # the layout F.linear gives with a cuSPARSELt weight: stride (1, tokens)
    fixed = _row_major_output(None, (), out)
    assert fixed.is_contiguous() and fixed.stride(-1) == 1 and torch.equal(fixed, out)
