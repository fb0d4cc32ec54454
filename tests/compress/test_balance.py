"""SmoothQuant and AWQ: scales move between activations and weights without changing the function."""

from functools import partial

import pytest
import torch

from slimserve.compress.args import QuantArgs
from slimserve.compress.calibration import capture_inputs, run_layer
from slimserve.compress.configs import AWQOptions, preset
from slimserve.compress.layer import LayerQuantizer
from slimserve.compress.quant import awq, qdq
from slimserve.compress.quant.smoothquant import smooth_scales
from slimserve.compress.report import CompressionReport, LayerRecord
from slimserve.compress.structure import apply_balance, balance_groups

from .conftest import samples, tiny_model


def test_balance_groups_of_a_llama_layer():
    layer = tiny_model("llama").model.layers[0]
    names = [(g.prev_name, g.linears) for g in balance_groups(layer)]
    assert names == [
        ("input_layernorm", ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"]),
        ("post_attention_layernorm", ["mlp.gate_proj", "mlp.up_proj"]),
        ("mlp.up_proj", ["mlp.down_proj"]),
    ]  # no v -> o group: with grouped-query attention v_proj is narrower than o_proj's input
    assert len(balance_groups(tiny_model("llama", num_key_value_heads=4).model.layers[0])) == 4


@pytest.mark.parametrize("family", ["qwen2", "gemma3"])
def test_apply_balance_keeps_the_function(family):
    model = tiny_model(family, num_key_value_heads=4)
    ids = samples(1, 20)[0]
    with torch.no_grad():
        before = model(ids).logits
        for layer in model.model.layers:
            for g in balance_groups(layer):
                width = layer.get_submodule(g.linears[0]).in_features
                apply_balance(layer, g, torch.rand(width) * 4 + 0.25)
        after = model(ids).logits
    assert torch.allclose(before, after, rtol=1e-4, atol=1e-4)


def test_smoothquant_flattens_activation_outliers():
    act = torch.tensor([100.0, 1.0, 1.0, 1.0])
    w = torch.ones(3, 4)
    s = smooth_scales(act, [w], alpha=0.5)
    assert torch.allclose(act / s, (w * s).abs().amax(0))  # alpha 0.5 balances both ranges


@pytest.mark.parametrize("duo_scaling", [False, True])
@pytest.mark.parametrize("symmetric", [True, False])
def test_awq_scale_and_clip_never_hurt(duo_scaling, symmetric):
    torch.manual_seed(0)
    x = torch.randn(256, 64) * (torch.rand(64) * 10)
    w = torch.randn(32, 64)
    args = QuantArgs(4, "int", symmetric, "group", 32)
    opts = AWQOptions(duo_scaling=duo_scaling)
    s, err, plain = awq.search_scale([w], awq.linear_output_error([w], x), x.abs().mean(0), args, opts)
    assert err < plain  # activation outliers this large always leave something to protect
    ref = x @ w.t()
    scaled = qdq.fake_quantize_weight(w * s, args, torch.float32) / s
    assert ((x @ scaled.t() - ref) ** 2).mean().item() < plain
    clipped = awq.search_clip(w, x, args, opts)
    plain_q = qdq.fake_quantize_weight(w, args, torch.float32)
    clip_q = qdq.fake_quantize_weight(clipped, args, torch.float32)
    assert ((x @ clip_q.t() - ref) ** 2).mean() <= ((x @ plain_q.t() - ref) ** 2).mean()


def test_awq_clip_bound_is_symmetric_on_an_asymmetric_grid():
    """Each group is clamped to +-r * max|w| (AutoAWQ's bound) on an asymmetric grid too: the weights past the
    bound move to it, and the side of a group that stays inside the bound keeps every weight, its extreme too."""
    torch.manual_seed(0)
    w = torch.randn(64, 128)
    w = torch.where(w < 0, 3 * w, w)  # every group reaches much further below zero than above
    x = torch.randn(256, 128) * (torch.rand(128) * 4)
    args = QuantArgs(4, "int", False, "group", 32)
    opts = AWQOptions()
    clipped = awq.search_clip(w, x, args, opts)
    wg, cg = w.view(64, 4, 32), clipped.view(64, 4, 32)
    bound = cg.abs().amax(-1, keepdim=True)
    assert torch.equal(clipped, torch.maximum(torch.minimum(wg, bound), -bound).view(64, 128))
    ratio = (bound / wg.abs().amax(-1, keepdim=True)).flatten()
    grid = torch.tensor([1 - k * (1 - opts.max_shrink) / (opts.clip_grid - 1) for k in range(opts.clip_grid)])
    assert torch.allclose((ratio[:, None] - grid).abs().amin(1), torch.zeros(ratio.numel()), atol=1e-5)
    narrow = (ratio < 1) & (wg.amax(-1).flatten() < bound.flatten())
    assert narrow.sum() > 10  # clipped groups whose upper side lies inside the bound
    assert torch.equal(cg.amax(-1).flatten()[narrow], wg.amax(-1).flatten()[narrow])
    plain = ((x @ (qdq.fake_quantize_weight(w, args, torch.float32) - w).t()) ** 2).mean()
    assert ((x @ (qdq.fake_quantize_weight(clipped, args, torch.float32) - w).t()) ** 2).mean() < plain


def test_awq_weight_mean_is_relative_to_each_group():
    w = torch.tensor([[1.0, -2.0, 4.0, 8.0], [0.0, 1.0, -1.0, 0.5]])
    args = QuantArgs(4, "int", True, "group", 2)
    expected = torch.tensor([[0.5, 1.0, 0.5, 1.0], [0.0, 1.0, 1.0, 0.5]]).mean(0)
    assert torch.allclose(awq.weight_mean(w, args), expected, atol=1e-5)


def test_awq_reference_is_the_balanced_weight_before_clipping():
    """up_proj is scaled by two groups (as a consumer of the norm and as the producer for down_proj): its clipped
    weight must equal the report's reference wherever it was not clipped, so the recorded errors mean something."""
    model = tiny_model("llama", num_key_value_heads=4)  # the v -> o group too: v_proj is in two groups as well
    config = preset("W4A16_ASYM", method="awq", group_size=32)
    config.awq.clip = True
    layers = model.model.layers
    hidden, kwargs = capture_inputs(model, layers, samples(4, 48), torch.device("cpu"))
    report = CompressionReport(scheme={}, device="cpu")
    quantizer = LayerQuantizer(layers[0], "model.layers.0", config, LayerRecord(0, 0.0, 0.0), report)
    with torch.no_grad():
        quantizer._awq(partial(run_layer, layers[0], hidden, kwargs[0]))
    assert {"model.layers.0.mlp.up_proj", "model.layers.0.self_attn.v_proj"} <= set(quantizer.reference)
    for name, ref in quantizer.reference.items():
        w = layers[0].get_submodule(name.removeprefix("model.layers.0.")).weight
        kept = w == ref
        assert kept.float().mean() > 0.5, name  # most weights lie inside their group's clipped range
        assert (w.abs() <= ref.abs() + 1e-6).all(), name  # the rest only moved towards zero, to the clip bound


@pytest.mark.parametrize("objective", ["layer", "linear"])
def test_awq_scales_lower_the_error_they_are_scored_on(objective):
    """Each group's chosen scales score no worse than none on their objective; the layer objective scores the
    decoder layer's output (zero for the unrounded weights) and restores the weights after every trial."""
    model = tiny_model("llama", num_key_value_heads=4)
    config = preset("W4A16_ASYM", method="awq", group_size=32)
    config.awq.objective = objective
    layers = model.model.layers
    hidden, kwargs = capture_inputs(model, layers, samples(4, 48), torch.device("cpu"))
    run = partial(run_layer, layers[0], hidden, kwargs[0])
    report = CompressionReport(scheme={}, device="cpu")
    record = LayerRecord(0, 0.0, 0.0)
    quantizer = LayerQuantizer(layers[0], "model.layers.0", config, record, report)
    with torch.no_grad():
        if objective == "layer":
            error = quantizer._layer_output_error(run)
            o_proj = layers[0].self_attn.o_proj
            before = o_proj.weight.clone()
            assert error([o_proj], [o_proj.weight.clone()]) == 0.0
            assert error([o_proj], [torch.zeros_like(before)]) > 0.0
            assert torch.equal(o_proj.weight, before)
        quantizer._awq(run)
    assert len(record.balance) == 4  # norm -> q/k/v, v -> o, norm -> gate/up, up -> down
    for scores in record.balance.values():
        assert scores["error"] <= scores["error_unscaled"]
