"""GPTQ against round-to-nearest on the same weights, and its handling of bad Hessians."""

import pytest
import torch

from slimserve.compress.args import QuantArgs
from slimserve.compress.configs import GPTQOptions
from slimserve.compress.quant.gptq import HessianAccumulator, _inverse_cholesky, gptq
from slimserve.compress.quant.rtn import rtn


def _correlated_inputs(n: int, dim: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(dim, dim, generator=g) / dim**0.5
    scale = torch.rand(dim, generator=g) * 3 + 0.1
    return (torch.randn(n, dim, generator=g) @ mix) * scale


def _output_error(w, wq, x):
    return ((x @ (wq - w).t()) ** 2).sum().item()


@pytest.mark.parametrize("actorder", [False, True])
@pytest.mark.parametrize("strategy,group", [("channel", None), ("group", 32)])
@pytest.mark.parametrize("symmetric", [True, False])
def test_gptq_beats_rtn(actorder, strategy, group, symmetric):
    torch.manual_seed(0)
    w = torch.randn(48, 128)
    x = _correlated_inputs(512, 128)
    acc = HessianAccumulator(128, torch.device("cpu"))
    for chunk in x.split(100):
        acc.add(chunk)
    assert torch.allclose(acc.h, 2 * x.t() @ x / x.shape[0], rtol=1e-4, atol=1e-4)
    args = QuantArgs(4, "int", symmetric, strategy, group)
    result = gptq(w, acc.h, args, GPTQOptions(actorder=actorder), torch.float32)
    base = rtn(w, args, torch.float32)
    assert result.damping == pytest.approx(0.01)
    assert result.weight.q.abs().max() <= 8
    assert _output_error(w, result.weight.dequantize(args), x) < 0.8 * _output_error(w, base.dequantize(args), x)


@pytest.mark.parametrize("strategy", ["channel", "tensor"])
def test_fp8_gptq_beats_rtn(strategy):
    """FP8 weights: the scales are round-to-nearest's (fixed from the original weight), every value is an E4M3
    number, and the layer's output error is lower."""
    torch.manual_seed(3)
    w = torch.randn(48, 128)
    x = _correlated_inputs(512, 128, seed=4)
    args = QuantArgs(8, "float", True, strategy)
    result = gptq(w, 2 * x.t() @ x / x.shape[0], args, GPTQOptions(), torch.float32)
    base = rtn(w, args, torch.float32)
    assert result.weight.q.dtype == torch.float8_e4m3fn and torch.equal(result.weight.scale, base.scale)
    assert result.weight.zero_point is None
    assert _output_error(w, result.weight.dequantize(args), x) < 0.8 * _output_error(w, base.dequantize(args), x)


def test_gptq_identity_hessian_is_rtn():
    """With uncorrelated inputs there is no error to compensate: GPTQ rounds to nearest."""
    torch.manual_seed(1)
    w = torch.randn(16, 64)
    args = QuantArgs(4, "int", True, "group", 32)
    result = gptq(w, torch.eye(64), args, GPTQOptions(actorder=False, damping=0.0), torch.float32)
    assert torch.equal(result.weight.q, rtn(w, args, torch.float32).q)
    fp8 = QuantArgs(8, "float", True, "channel")
    result = gptq(w, torch.eye(64), fp8, GPTQOptions(actorder=False, damping=0.0), torch.float32)
    assert torch.equal(result.weight.q.float(), rtn(w, fp8, torch.float32).q.float())


def test_cholesky_failure_raises_damping():
    torch.manual_seed(2)
    w = torch.randn(8, 32)
    a = torch.randn(32, 4)
    h = a @ a.t() / 4
    h -= 0.05 * torch.diagonal(h).mean() * torch.eye(32)  # rank 4 plus rounding noise: indefinite
    result = gptq(w, h, QuantArgs(4, "int", True, "channel"), GPTQOptions(damping=0.01), torch.float32)
    assert result is not None
    assert result.damping == pytest.approx(0.1)


def test_dead_inputs_and_non_finite_hessian():
    w = torch.randn(8, 32)
    h = torch.eye(32)
    h[3, 3] = 0  # an input channel that never fires: its weights are irrelevant and become 0
    args = QuantArgs(8, "int", True, "channel")
    result = gptq(w, h, args, GPTQOptions(), torch.float32)
    assert torch.all(result.weight.q[:, 3] == 0)
    h[0, 0] = float("nan")
    assert gptq(w, h, args, GPTQOptions(), torch.float32) is None


def test_inverse_cholesky_matches_the_factor_of_the_inverse():
    """The reversed-order factorization gives the upper Cholesky factor of the damped inverse Hessian."""
    x = _correlated_inputs(300, 96, seed=3).double()
    h = 2 * x.t() @ x / x.shape[0]
    damped = h + 0.01 * torch.diagonal(h).mean() * torch.eye(96, dtype=h.dtype)
    upper, damp = _inverse_cholesky(h.clone(), GPTQOptions(damping=0.01))
    expected = torch.linalg.cholesky(torch.linalg.inv(damped), upper=True)
    assert damp == pytest.approx(0.01)
    assert torch.equal(upper, upper.triu())
    assert torch.allclose(upper, expected, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("dim", [96, 1000])
def test_hessian_tiles_cover_the_whole_matrix(dim):
    """Wide inputs accumulate only the upper tiles; reading h gives the full symmetric matrix."""
    x = torch.randn(300, dim, generator=torch.Generator().manual_seed(4))
    acc = HessianAccumulator(dim, torch.device("cpu"))
    for chunk in x.split(128):
        acc.add(chunk)
    assert torch.allclose(acc.h, 2 * x.t() @ x / x.shape[0], rtol=1e-4, atol=1e-4)
    assert torch.equal(acc.h, acc.h.t())
