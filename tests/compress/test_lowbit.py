"""Rotations, 2/3-bit and ternary grids, the MSE observer and HQQ: exact where they must be (rotations keep the
model's function, packing matches compressed-tensors bit for bit, checkpoints load in transformers) and better
where they claim to be (rotation, MSE clipping and HQQ each lower the error they target)."""

import copy
import json

import pytest
import torch
from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

from slimserve.compress import Calibration, preset, quantize_, save_compressed
from slimserve.compress.args import QuantArgs
from slimserve.compress.cli import main
from slimserve.compress.errors import QuantConfigError
from slimserve.compress.hadamard import hadamard, random_hadamard
from slimserve.compress.loading import load_causal_lm
from slimserve.compress.modules import QuantizedLinear
from slimserve.compress.quant import observers, qdq
from slimserve.compress.quant.hqq import HQQOptions, hqq
from slimserve.compress.quant.packing import pack_int32, unpack_int32
from slimserve.compress.recipe import parse_recipe
from slimserve.compress.rotation import RotationConfig, rotate_model

from .conftest import byte_tokenizer, samples, tiny_model


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("n", [12, 20, 64, 576, 896, 1536])
def test_hadamard_orders(n):
    h = hadamard(n)
    assert h is not None and set(h.unique().tolist()) == {-1.0, 1.0}
    torch.testing.assert_close(h @ h.t(), n * torch.eye(n, dtype=torch.float64))


@pytest.mark.parametrize("n", [576, 36])  # 36: no Hadamard construction here, the orthogonal fallback
def test_random_rotation_is_orthogonal(n):
    q = random_hadamard(n, torch.Generator().manual_seed(1))
    torch.testing.assert_close(q @ q.t(), torch.eye(n, dtype=torch.float64))


@pytest.mark.parametrize("family", ["llama", "qwen2"])
@pytest.mark.parametrize("kind", ["hadamard", "orthogonal"])
def test_rotation_keeps_the_function(family, kind):
    model = tiny_model(family)
    ids = samples(1, 40, seed=7)[0]
    with torch.no_grad():
        before = model(ids).logits
        rotated = copy.deepcopy(model)
        rotate_model(rotated, RotationConfig(kind=kind))
        after = rotated(ids).logits
    assert _rel(after, before) < 1e-5
    assert rotated.lm_head.weight.data_ptr() != rotated.model.embed_tokens.weight.data_ptr()
    assert not rotated.config.tie_word_embeddings
    assert torch.equal(rotated.model.norm.weight, torch.ones_like(rotated.model.norm.weight))


def test_rotation_rejects_sandwich_norms():
    with pytest.raises(QuantConfigError, match="pre-norm RMSNorm"):
        rotate_model(tiny_model("gemma3"), RotationConfig())


@pytest.mark.parametrize("scheme", ["W4A16", "W4A4"])
def test_rotation_lowers_the_error_of_rounding(scheme):
    model = tiny_model("llama")
    ids = samples(1, 40, seed=7)[0]
    with torch.no_grad():
        ref = model(ids).logits
    errors = []
    for rotation in (None, RotationConfig()):
        q = copy.deepcopy(model)
        quantize_(q, preset(scheme, rotation=rotation), progress=False)
        with torch.no_grad():
            errors.append(_rel(q(ids).logits, ref))
    assert errors[1] < errors[0]


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_dense_packing_matches_compressed_tensors(bits):
    q = torch.randint(-(1 << (bits - 1)), 1 << (bits - 1), (7, 77), dtype=torch.int8)
    for dim in (0, 1):
        assert torch.equal(pack_int32(q, bits, dim), pack_to_int32(q, bits, dim))
    assert torch.equal(unpack_int32(pack_int32(q, bits), bits, 77), q)


def _weights(heavy_tailed: bool) -> torch.Tensor:
    torch.manual_seed(0)
    if heavy_tailed:
        return torch.distributions.StudentT(3.0).sample((64, 256)) * 0.02
    return torch.randn(64, 256) * 0.02


@pytest.mark.parametrize("bits", [2, 3])
def test_mse_observer_beats_minmax(bits):
    w = _weights(heavy_tailed=True)
    args = QuantArgs(bits, "int", False, "group", 64)
    minmax = qdq.fake_quantize_weight(w, args, torch.float32)
    scale, zp = qdq.qparams(*observers.weight_range(w, args, "mse"), args, torch.float32)
    mse = qdq.dequantize(qdq.quantize(w, scale, zp, args), scale, zp, args)
    assert _rel(mse, w) < _rel(minmax, w)


@pytest.mark.parametrize("bits", [2, 4])
def test_mse_observer_early_stop_keeps_the_exhaustive_optimum(bits, monkeypatch):
    """Stopping once no row improves for a few ratios loses (almost) nothing against trying every ratio."""
    w = _weights(heavy_tailed=True).reshape(-1, 64)
    args = QuantArgs(bits, "int", False, "group", 64)

    def error(lo, hi):
        return observers._row_error(w, lo, hi, args).sum().item()

    early = error(*observers.mse_row_range(w, args))
    monkeypatch.setattr(observers, "MSE_PATIENCE", observers.MSE_STEPS)
    exhaustive = error(*observers.mse_row_range(w, args))
    assert exhaustive <= early <= 1.01 * exhaustive


# HQQ moves zero points only: on very heavy tails at 2 bits the min/max scale itself is the problem.
@pytest.mark.parametrize("bits,heavy_tailed", [(2, False), (3, True), (4, True)])
def test_hqq_beats_minmax(bits, heavy_tailed):
    w = _weights(heavy_tailed)
    args = QuantArgs(bits, "int", False, "group", 64)
    minmax = qdq.fake_quantize_weight(w, args, torch.float32)
    h = hqq(w, args, HQQOptions(), torch.float32)
    assert (h.dequantize(args) - w).abs().mean() < (minmax - w).abs().mean()
    assert h.zero_point.is_floating_point()


def test_ternary_codes_and_scheme():
    model = tiny_model("llama")
    quantize_(model, preset("TERNARY"), progress=False)
    linears = [m for m in model.modules() if isinstance(m, QuantizedLinear)]
    assert linears and all(set(m.codes().unique().tolist()) <= {-1, 0, 1} for m in linears)
    assert linears[0].weight_args.num_bits == 2


CASES = [("W2A16", {"method": "gptq"}), ("W3A16", {}), ("TERNARY", {"method": "gptq", "rotation": RotationConfig()})]


@pytest.mark.parametrize("scheme,options", CASES, ids=[c[0] for c in CASES])
def test_low_bit_checkpoints_load_in_transformers(tmp_path, scheme, options):
    model = tiny_model("qwen2")
    config = preset(scheme, **options)
    report = quantize_(model, config, Calibration(samples(), "test"), progress=False)
    ids = samples(1, 40, seed=7)[0]
    with torch.no_grad():
        ours = model(ids).logits
    out = save_compressed(model, config, tmp_path / "q", report=report)
    assert json.loads((out / "config.json").read_text())["quantization_config"]["format"] == "pack-quantized"
    loaded, _ = load_causal_lm(str(out))
    with torch.no_grad():
        assert _rel(loaded(ids).logits, ours) < 1e-3


def test_hqq_needs_asymmetric_weights():
    with pytest.raises(QuantConfigError, match="asymmetric"):
        preset("W4A16", method="hqq")
    assert not preset("W2A16", method="hqq").needs_calibration


def test_cli_rotate_and_recipe_stage(tmp_path):
    folder = tmp_path / "tiny"
    tiny_model("llama", hidden_size=64, intermediate_size=128).save_pretrained(folder)
    byte_tokenizer().save_pretrained(folder)
    out = tmp_path / "w2"
    assert main(["compress", str(folder), "--scheme", "W2A16", "--method", "hqq", "--rotate", "--out", str(out)]) == 0
    report = json.loads((out / "slimserve_report.json").read_text())
    assert report["scheme"]["rotation"]["kind"] == "hadamard" and report["scheme"]["method"] == "hqq"
    recipe = parse_recipe({"scheme": "W3A16", "stages": [{"rotate": {"kind": "orthogonal"}}, {"gptq": {}}]})
    assert recipe.config.rotation.kind == "orthogonal" and recipe.config.method == "gptq"
