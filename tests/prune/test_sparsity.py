"""Wanda and SparseGPT give exactly the pattern asked for, SparseGPT's output error beats magnitude's on the
same weights, and joint SparseGPT quantization keeps its zeros on the integer grid."""

import pytest
import torch

from slimserve.compress.configs import preset
from slimserve.compress.errors import QuantConfigError
from slimserve.compress.prune import SparsityConfig
from slimserve.compress.prune.methods import magnitude, sparsegpt, wanda
from slimserve.compress.quant.gptq import HessianAccumulator

ROWS, COLS = 48, 256


def weights_and_inputs(seed: int):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(ROWS, COLS, generator=g)
    # Inputs with uneven channel scales and correlations: what makes calibration-aware pruning matter.
    mix = torch.randn(COLS, COLS, generator=g) / COLS**0.5 + torch.eye(COLS)
    x = (torch.randn(512, COLS, generator=g) @ mix) * (torch.rand(COLS, generator=g) * 3 + 0.1)
    acc = HessianAccumulator(COLS, torch.device("cpu"))
    acc.add(x)
    return w, x, acc.h


def prune_all(config: SparsityConfig, seed: int = 0) -> dict[str, torch.Tensor]:
    w, x, h = weights_and_inputs(seed)
    return {
        "magnitude": magnitude(w, config),
        "wanda": wanda(w, torch.diagonal(h), config),
        "sparsegpt": sparsegpt(w, h, config)[0],
    }


def output_error(seed: int, pruned: torch.Tensor) -> float:
    w, x, _ = weights_and_inputs(seed)
    return ((x @ (w - pruned).T).norm() / (x @ w.T).norm()).item()


@pytest.mark.parametrize("sparsity", [0.5, 0.3])
def test_unstructured_prunes_exactly_the_fraction_of_every_row(sparsity):
    for name, p in prune_all(SparsityConfig(sparsity=sparsity)).items():
        zeros = (p == 0).sum(1)
        assert (zeros == round(COLS * sparsity)).all(), name


def test_two_four_zeroes_two_of_every_four():
    for name, p in prune_all(SparsityConfig(structure="2:4")).items():
        zeros = (p.reshape(ROWS, COLS // 4, 4) == 0).sum(-1)
        assert (zeros == 2).all(), name


@pytest.mark.parametrize("structure", ["unstructured", "2:4"])
@pytest.mark.parametrize("seed", [0, 1])
def test_sparsegpt_layer_error_below_magnitude_and_wanda(structure, seed):
    pruned = prune_all(SparsityConfig(structure=structure), seed)
    errors = {name: output_error(seed, p) for name, p in pruned.items()}
    assert errors["sparsegpt"] < errors["magnitude"]
    assert errors["sparsegpt"] < errors["wanda"]
    assert errors["wanda"] < errors["magnitude"]


def test_magnitude_keeps_the_largest_weights():
    w = torch.tensor([[0.1, -4.0, 0.3, 2.0], [5.0, -0.2, 0.0, -1.0]])
    p = magnitude(w, SparsityConfig("magnitude", structure="2:4"))
    assert torch.equal(p, torch.tensor([[0.0, -4.0, 0.0, 2.0], [5.0, 0.0, 0.0, -1.0]]))


@pytest.mark.parametrize("scheme,group_size", [("W4A16", 64), ("W8A16", None)])
def test_joint_sparsegpt_quantization(scheme, group_size):
    w, x, h = weights_and_inputs(2)
    quant = preset(scheme, group_size=group_size)
    config = SparsityConfig(structure="2:4", quant=quant)
    pruned, codes = sparsegpt(w, h, config, quant.weight_args())
    args = quant.weight_args()
    assert args.qmin <= codes.q.min() and codes.q.max() <= args.qmax
    assert torch.allclose(codes.dequantize(args), pruned, atol=1e-6)
    assert ((pruned.reshape(ROWS, -1, 4) == 0).sum(-1) >= 2).all()
    # Compensating the rounding too beats pruning first and rounding afterwards.
    plain = sparsegpt(w, h, SparsityConfig(structure="2:4"))[0]
    s = codes.scale.float().repeat_interleave(COLS // codes.scale.shape[1], 1)
    rounded_after = (plain / s).round().clamp(args.qmin, args.qmax) * s
    assert output_error(2, pruned) < output_error(2, rounded_after)


def test_bad_configs_are_one_line_errors():
    with pytest.raises(QuantConfigError, match="N:M"):
        SparsityConfig(structure="2-4")
    with pytest.raises(QuantConfigError, match="sparsegpt"):
        SparsityConfig("wanda", quant=preset("W4A16"))
    with pytest.raises(QuantConfigError, match="symmetric integer"):
        SparsityConfig(quant=preset("FP8"))
    with pytest.raises(QuantConfigError, match="unknown pruning method"):
        SparsityConfig("random")
