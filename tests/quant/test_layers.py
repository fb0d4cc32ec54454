"""Each quantized layer class, loaded from its checkpoint layout (fused shards included), computes x @ W^T
for the dense W that the format's own definition gives, written out here independently of the loader."""

import pytest
import torch

from slimserve.kernels.quant_gemm_ref import pack_codes
from slimserve.layers.quantized import QuantizationConfig, make_quantized_linear
from slimserve.layers.quantized.awq import AWQ_ORDER

K = 256
SHARDS = [64, 32, 32]  # a fused q|k|v with shards of unequal height
NAMES = [f"model.layers.0.self_attn.{p}_proj" for p in "qkv"]


def build(quant: dict, shards: list[dict[str, torch.Tensor]]):
    config = QuantizationConfig.from_model_config({"quantization_config": quant})
    layer = make_quantized_linear(config, NAMES, K, SHARDS)
    for i, part in enumerate(shards):
        for name, tensor in part.items():
            layer.load_shard(f"{NAMES[i]}.{name}", name, tensor, i)
    layer.finish_loading()
    return layer


def check(layer, dense: list[torch.Tensor], tol: float = 1e-5) -> None:
    x = torch.randn(5, K)
    want = x @ torch.cat(dense).t()
    err = ((layer(x) - want).norm() / want.norm()).item()
    assert err < tol, err


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("desc_act", [False, True])
def test_gptq(bits, desc_act):
    g, per_word = 64, 32 // bits
    shards, dense = [], []
    # With act order every shard of a fused layer shares the input permutation (they share the input).
    g_idx = (torch.randperm(K) // g).int() if desc_act else (torch.arange(K) // g).int()
    for rows in SHARDS:
        codes = torch.randint(0, 1 << bits, (K, rows))
        zeros = torch.randint(0, (1 << bits) - 1, (K // g, rows))
        scales = torch.rand(K // g, rows) * 0.01 + 0.001
        qweight = pack_codes(codes.t(), bits).t().contiguous()
        assert qweight.shape == (K // per_word, rows)
        shards.append({"qweight": qweight, "qzeros": pack_codes(zeros, bits), "scales": scales.half().float(),
                       "g_idx": g_idx})  # fmt: skip
        # GPTQ v1 stores every zero point minus one.
        dense.append(((codes - (zeros + 1)[g_idx.long()]) * shards[-1]["scales"][g_idx.long()]).t())
    quant = {"quant_method": "gptq", "bits": bits, "group_size": g, "desc_act": desc_act, "sym": False}
    layer = build(quant, shards)
    assert (layer.perm is not None) == desc_act
    check(layer, dense)


def test_awq():
    g = 32
    shards, dense = [], []
    order = torch.tensor(AWQ_ORDER)
    for rows in SHARDS:
        codes = torch.randint(0, 16, (K, rows))
        zeros = torch.randint(0, 16, (K // g, rows))
        scales = torch.rand(K // g, rows) * 0.01 + 0.001

        def awq_pack(t: torch.Tensor) -> torch.Tensor:  # AutoAWQ: nibble i of a word holds column AWQ_ORDER[i]
            return pack_codes(t.view(t.shape[0], -1, 8)[..., order].flatten(1), 4)

        shards.append({"qweight": awq_pack(codes), "qzeros": awq_pack(zeros), "scales": scales})
        rep = torch.arange(K) // g
        dense.append(((codes - zeros[rep]) * scales[rep]).t())
    check(build({"quant_method": "awq", "bits": 4, "group_size": g, "zero_point": True, "version": "gemm"}, shards),
          dense)  # fmt: skip


def fp8(rows: int, cols: int) -> torch.Tensor:
    return (torch.randn(rows, cols) * 40).to(torch.float8_e4m3fn)


def test_fp8_per_tensor_weight_only_path_matches_dequantized():
    shards, dense = [], []
    for rows in SHARDS:
        w, s = fp8(rows, K), torch.rand(()) * 0.01
        shards.append({"weight": w, "weight_scale": s})
        dense.append(w.float() * s)
    quant = {"quant_method": "compressed-tensors", "format": "float-quantized", "ignore": ["lm_head"],
             "config_groups": {"g": {"targets": ["Linear"], "weights": {"num_bits": 8, "type": "float",
                                                                         "strategy": "tensor"}}}}  # fmt: skip
    check(build(quant, shards), dense)


def test_fp8_method_block_with_scale_inv():
    shards, dense = [], []
    for rows in SHARDS:
        w = fp8(rows, K)
        s = torch.rand(1, 2) * 0.01  # one 128-row block covers each (shorter) shard
        shards.append({"weight": w, "weight_scale_inv": s})
        dense.append(w.float() * s.repeat_interleave(128, 1)[:, :K])
    layer = build({"quant_method": "fp8", "activation_scheme": "dynamic", "weight_block_size": [128, 128]}, shards)
    check(layer, dense, tol=0.06)  # activations are rounded to FP8 per group of 128


def test_fp8_method_per_tensor_static_activation():
    shards, dense = [], []
    for rows in SHARDS:
        w, s = fp8(rows, K), torch.rand(()) * 0.01
        shards.append({"weight": w, "weight_scale": s, "input_scale": torch.tensor(0.01 + 0.001 * rows / 32)})
        dense.append(w.float() * s)
    layer = build({"quant_method": "fp8", "activation_scheme": "static"}, shards)
    assert layer.input_scale.item() == pytest.approx(0.012)  # the fused layer takes the largest input scale
    check(layer, dense, tol=0.06)


@pytest.mark.parametrize(
    "quant",
    [
        {"quant_method": "gptq", "bits": 4, "group_size": 128, "desc_act": False},
        {"quant_method": "awq", "bits": 4, "group_size": 64, "zero_point": True},
        {"quant_method": "fp8", "activation_scheme": "dynamic", "weight_block_size": [128, 128]},
        {"quant_method": "fp8", "activation_scheme": "dynamic"},
    ],
    ids=["gptq", "awq", "fp8-block", "fp8"],
)
def test_dummy_weights_build(quant):
    """load_format="dummy" draws checkpoint-layout tensors and converts them like loaded ones."""
    config = QuantizationConfig.from_model_config({"quantization_config": quant})
    layer = make_quantized_linear(config, NAMES, K, SHARDS)
    layer.load_dummy(torch.Generator().manual_seed(0))
    y = layer(torch.randn(3, K))
    assert y.shape == (3, sum(SHARDS)) and torch.isfinite(y).all() and y.abs().sum() > 0


@pytest.mark.parametrize(
    "quant,head",
    [
        ({"quant_method": "gptq", "bits": 4, "group_size": 128}, False),
        ({"quant_method": "gptq", "bits": 4, "group_size": 128, "lm_head": True}, True),
        ({"quant_method": "awq", "bits": 4, "group_size": 128}, False),
        ({"quant_method": "fp8", "activation_scheme": "dynamic"}, False),
        ({"quant_method": "compressed-tensors", "format": "pack-quantized", "ignore": ["lm_head"],
          "config_groups": {"g": {"targets": ["Linear"], "weights": {"num_bits": 4, "strategy": "group",
                                                                      "group_size": 128, "symmetric": True}}}}, False),
        ({"quant_method": "compressed-tensors", "format": "pack-quantized", "ignore": [],
          "config_groups": {"g": {"targets": ["Linear"], "weights": {"num_bits": 4, "strategy": "group",
                                                                      "group_size": 128, "symmetric": True}}}}, True),
    ],
    ids=["gptq", "gptq-lm_head", "awq", "fp8", "ct-ignored", "ct-targeted"],
)  # fmt: skip
def test_which_checkpoints_quantize_the_output_head(quant, head):
    config = QuantizationConfig.from_model_config({"quantization_config": quant})
    assert (config.scheme("lm_head") is not None) == head
    assert config.scheme("model.layers.0.mlp.down_proj") is not None


def test_a_named_target_takes_precedence_over_the_class():
    """compressed-tensors mixed precision: a group that names a module (or matches it by regex) wins over one
    that targets every Linear, whatever the groups' order."""

    def weights(bits: int) -> dict:
        return {"weights": {"num_bits": bits, "strategy": "group", "group_size": 128, "symmetric": True}}

    groups = {"head": {"targets": ["lm_head"], **weights(8)}, "down": {"targets": ["re:.*down_proj$"], **weights(8)},
              "rest": {"targets": ["Linear"], **weights(4)}}  # fmt: skip
    for order in (list(groups), list(groups)[::-1]):
        quant = {"quant_method": "compressed-tensors", "format": "pack-quantized", "ignore": [],
                 "config_groups": {name: groups[name] for name in order}}  # fmt: skip
        config = QuantizationConfig.from_model_config({"quantization_config": quant})
        assert config.scheme("lm_head").bits == 8
        assert config.scheme("model.layers.3.mlp.down_proj").bits == 8
        assert config.scheme("model.layers.3.self_attn.o_proj").bits == 4


def test_unsupported_method_is_a_clear_error():
    from slimserve.errors import CheckpointError

    with pytest.raises(CheckpointError, match="bitsandbytes"):
        QuantizationConfig.from_model_config({"quantization_config": {"quant_method": "bitsandbytes"}})


def test_int8_channel_weights_use_the_cpu_int8_kernel():
    """Per-channel symmetric INT8 (compressed-tensors int-quantized) runs on PyTorch's CPU INT8 weight kernel."""
    shards, dense = [], []
    for rows in SHARDS:
        q = torch.randint(-128, 128, (rows, K), dtype=torch.int8)
        s = torch.rand(rows, 1) * 0.01
        shards.append({"weight": q, "weight_scale": s})
        dense.append(q.float() * s)
    weights = {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "channel"}
    quant = {"quant_method": "compressed-tensors", "format": "int-quantized",
             "config_groups": {"g": {"targets": ["Linear"], "weights": weights}}}  # fmt: skip
    layer = build(quant, shards)
    assert layer.cpu_int8 is not None
    check(layer, dense)
