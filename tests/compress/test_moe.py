"""MoE experts: unfused into per-expert linear layers with the same function, calibrated through the real
routing (experts that see no token counted and rounded to nearest), written under the names checkpoints use,
and loaded back by `transformers` through compressed-tensors."""

import copy

import pytest
import torch
from safetensors import safe_open
from transformers import (
    MixtralConfig,
    MixtralForCausalLM,
    Qwen2MoeConfig,
    Qwen2MoeForCausalLM,
    Qwen3MoeConfig,
    Qwen3MoeForCausalLM,
)

from slimserve.compress import Calibration, preset, quantize_, save_compressed
from slimserve.compress.loading import load_causal_lm
from slimserve.compress.moe import UnfusedExperts, unfuse_experts

from .conftest import VOCAB, samples

COMMON = dict(
    hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, vocab_size=VOCAB,
    max_position_embeddings=256, num_experts_per_tok=2,
)  # fmt: skip
FAMILIES = {
    "qwen3_moe": lambda: Qwen3MoeForCausalLM(
        Qwen3MoeConfig(**COMMON, head_dim=16, intermediate_size=128, moe_intermediate_size=64, num_experts=8)
    ),
    "qwen2_moe": lambda: Qwen2MoeForCausalLM(
        Qwen2MoeConfig(
            **COMMON, intermediate_size=128, moe_intermediate_size=64, shared_expert_intermediate_size=96, num_experts=8
        )
    ),
    "mixtral": lambda: MixtralForCausalLM(MixtralConfig(**COMMON, intermediate_size=64, num_local_experts=8)),
}
# Where layer 0's expert 0 gate projection lives in each family's checkpoints.
GATE_NAMES = {
    "qwen3_moe": "model.layers.0.mlp.experts.0.gate_proj",
    "qwen2_moe": "model.layers.0.mlp.experts.0.gate_proj",
    "mixtral": "model.layers.0.block_sparse_moe.experts.0.w1",
}


def moe_model(family: str) -> torch.nn.Module:
    torch.manual_seed(0)
    model = FAMILIES[family]().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" not in name:
                p.normal_(0, 0.1)
    return model


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_unfused_experts_compute_what_the_fused_bank_computes(family):
    model = moe_model(family)
    ids = samples(2, 24, seed=3)
    unfused = copy.deepcopy(model)
    banks = unfuse_experts(unfused)
    assert len(banks) == 2 and all(len(b) == 8 for b in banks)
    with torch.no_grad():
        for x in ids:
            torch.testing.assert_close(unfused(x).logits, model(x).logits, rtol=0, atol=1e-5)
        for bank in banks:
            bank.calibrate_all = True  # every expert runs on every token; the output must not change
        for x in ids:
            torch.testing.assert_close(unfused(x).logits, model(x).logits, rtol=0, atol=1e-5)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_experts_are_calibrated_through_their_routing_and_load_in_transformers(tmp_path, family):
    model = moe_model(family)
    config = preset("W4A16", group_size=32, method="gptq")
    # Few tokens and eight experts: some experts see none of them.
    report = quantize_(model, config, Calibration(samples(1, 6), "test"), progress=False)
    assert report.uncalibrated_experts, "expected experts without calibration tokens"
    linears = {f"model.layers.{r.index}.{k}": v.method for r in report.layers for k, v in r.linears.items()}
    for name, method in linears.items():
        expert = name.rsplit(".", 1)[0]
        if ".experts." in name:
            assert method == ("rtn (no calibration tokens)" if expert in report.uncalibrated_experts else "gptq")
    assert not any("experts" in w for w in report.unquantized_weights)
    ids = samples(1, 16, seed=2)[0]
    with torch.no_grad():
        ours = model(ids).logits
    out = save_compressed(model, config, tmp_path / "q", report=report)
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert f"{GATE_NAMES[family]}.weight_packed" in set(f.keys())
    loaded, _ = load_causal_lm(str(out))
    with torch.no_grad():
        assert ((ours - loaded(ids).logits).norm() / ours.norm()).item() < 1e-3


def test_calibrating_all_experts_leaves_none_uncalibrated():
    model = moe_model("qwen3_moe")
    config = preset("W4A16", group_size=32, method="gptq", moe_calibrate_all_experts=True)
    report = quantize_(model, config, Calibration(samples(1, 6), "test"), progress=False)
    assert report.uncalibrated_experts == []
    assert all(v.method == "gptq" for r in report.layers for v in r.linears.values())
    assert not any(isinstance(m, UnfusedExperts) and m.calibrate_all for m in model.modules())


def test_static_activation_scales_of_unrouted_experts_come_from_their_siblings():
    model = moe_model("mixtral")
    report = quantize_(model, preset("FP8_STATIC"), Calibration(samples(1, 6), "test"), progress=False)
    unrouted = report.uncalibrated_experts[0]
    layer, expert = unrouted.rsplit(".", 1)
    bank = model.get_submodule(layer)
    scales = torch.stack(
        [e.w1.input_scale for i, e in enumerate(bank) if f"{layer}.{i}" not in report.uncalibrated_experts]
    )
    assert torch.equal(bank[int(expert)].w1.input_scale, scales.amax(0))
