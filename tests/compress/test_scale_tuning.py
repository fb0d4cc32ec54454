"""Scale tuning after rounding: the distilled scales bring the quantized model closer to the original (KL on the
tuning text), the codes and the checkpoint's tensors stay as they were, and `slimserve compress` records the run."""

import copy
import json

import pytest
import torch

from slimserve.compress import Calibration, preset, quantize_
from slimserve.compress.cli import main
from slimserve.compress.loading import load_causal_lm
from slimserve.compress.modules import QuantizedLinear
from slimserve.compress.scale_tuning import trainable_scales, tune_scales
from slimserve.distill.config import DistillConfig, DistillError
from slimserve.distill.loss import logit_kl

from .conftest import byte_tokenizer, samples, tiny_model


def kl(student, teacher, ids: torch.Tensor) -> float:
    with torch.no_grad():
        return logit_kl(student(input_ids=ids).logits, teacher(input_ids=ids).logits, 1.0).item()


def quantized_layers(model) -> list[QuantizedLinear]:
    return [m for m in model.modules() if isinstance(m, QuantizedLinear)]


@pytest.mark.parametrize("scheme", ["TERNARY", "W2A16"])
def test_tuning_lowers_the_kl_and_keeps_the_codes(scheme):
    teacher = tiny_model("llama", hidden_size=64, intermediate_size=128)
    student = copy.deepcopy(teacher)
    quantize_(student, preset(scheme), Calibration(samples(), "test"), progress=False)
    ids = torch.cat(samples(8, 32, seed=3))
    codes = [m.codes().clone() for m in quantized_layers(student)]
    scales = [m.weight_scale.clone() for m in quantized_layers(student)]
    keys = {k: v.dtype for k, v in student.state_dict().items()}
    before = kl(student, teacher, ids)
    config = DistillConfig(steps=20, batch_size=4, lr=1e-3, warmup_steps=2, save_every=0, gradient_checkpointing=False)
    tune_scales(teacher, student, ids, config, progress=False)
    assert kl(student, teacher, ids) < 0.9 * before
    layers = quantized_layers(student)
    assert all(torch.equal(c, m.codes()) for c, m in zip(codes, layers))
    assert any(not torch.equal(s, m.weight_scale) for s, m in zip(scales, layers))
    assert {k: v.dtype for k, v in student.state_dict().items()} == keys  # same checkpoint tensors
    assert all("weight_scale" in m._buffers for m in layers)  # buffers again, as the writer expects


def test_only_the_scales_train():
    student = tiny_model("llama", hidden_size=64, intermediate_size=128)
    quantize_(student, preset("W2A16"), Calibration(samples(), "test"), progress=False)
    with trainable_scales(student) as params:
        trainable = [p for p in student.parameters() if p.requires_grad]
        assert len(trainable) == len(params) == len(quantized_layers(student))
        assert all(any(p is q for q in params) for p in trainable)


def test_tuning_refuses_weight_decay_and_unquantized_models():
    teacher = tiny_model("llama")
    with pytest.raises(DistillError, match="no quantized layers"):
        tune_scales(teacher, copy.deepcopy(teacher), torch.cat(samples()), DistillConfig(steps=1), progress=False)
    with pytest.raises(DistillError, match="weight_decay"):
        tune_scales(teacher, teacher, torch.cat(samples()), DistillConfig(steps=1, weight_decay=0.1), progress=False)


def test_compress_cli_tunes_and_records(tmp_path, capsys):
    folder = tmp_path / "tiny"
    tiny_model("llama", hidden_size=64, intermediate_size=128).save_pretrained(folder)
    byte_tokenizer().save_pretrained(folder)
    out = tmp_path / "ternary"
    args = ["compress", str(folder), "--scheme", "TERNARY", "--group-size", "32", "--tune-scales-steps", "4"]
    assert main([*args, "--num-samples", "4", "--seq-len", "32", "--out", str(out)]) == 0
    tuning = json.loads((out / "slimserve_report.json").read_text())["scale_tuning"]
    assert tuning["steps"] == 4 and tuning["first_loss"] > 0
    loaded, _ = load_causal_lm(str(out))  # still a compressed-tensors checkpoint transformers reads
    assert torch.isfinite(loaded(input_ids=torch.tensor([[5, 6, 7]])).logits).all()
    assert main([*args[:-1], "-2", "--out", str(tmp_path / "bad")]) == 2
    assert "must be positive" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()
