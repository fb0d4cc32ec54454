"""The distillation loop lowers the KL to the teacher, and an interrupted run resumes to the same weights."""

import pytest
import torch

from slimserve.compress.prune.importance import estimate_importance
from slimserve.compress.prune.structured import apply_structured, shape_from_ratios
from slimserve.distill import DistillConfig, DistillError, distill
from tests.compress.conftest import VOCAB, samples, tiny_model

CPU = torch.device("cpu")


def pair():
    teacher = tiny_model("llama", num_hidden_layers=2)
    importance = estimate_importance(teacher, samples(2), CPU, progress=False)
    student = apply_structured(teacher, importance, shape_from_ratios(teacher.config, mlp_ratio=0.5, hidden_ratio=0.75))
    return teacher, student


def data(rows: int = 8, length: int = 24) -> torch.Tensor:
    return torch.randint(3, VOCAB, (rows, length), generator=torch.Generator().manual_seed(5))


def test_loss_decreases(tmp_path):
    teacher, student = pair()
    config = DistillConfig(steps=16, batch_size=4, lr=3e-3, warmup_steps=2, save_every=0, gradient_checkpointing=False)
    result = distill(teacher, student, data(), config, tmp_path, progress=False)
    assert result.steps == 16 and len(result.losses) == 16
    assert sum(result.losses[-4:]) / 4 < 0.7 * sum(result.losses[:4]) / 4
    assert (tmp_path / "checkpoints" / "step-16" / "student.safetensors").is_file()


def test_interrupted_run_resumes_to_the_same_weights(tmp_path):
    teacher, student = pair()
    _, twin = pair()
    config = DistillConfig(steps=6, batch_size=2, lr=1e-3, warmup_steps=2, save_every=0, hidden_weight=0.0)
    whole = distill(teacher, twin, data(), config, tmp_path / "whole", progress=False)
    # A zero time budget stops after the first step, with a checkpoint.
    cut = DistillConfig(**{**config.to_dict(), "max_seconds": 0.0})
    first = distill(teacher, student, data(), cut, tmp_path / "cut", progress=False)
    assert first.steps == 1
    _, fresh = pair()
    rest = distill(teacher, fresh, data(), config, tmp_path / "cut", progress=False)
    assert rest.resumed_from == 1 and rest.steps == 6
    assert rest.losses == pytest.approx(whole.losses, rel=1e-4)
    for (name, a), b in zip(fresh.named_parameters(), twin.parameters()):
        assert torch.allclose(a, b, atol=1e-6), name


def test_hidden_loss_and_mismatches(tmp_path):
    teacher, student = pair()
    with pytest.raises(DistillError, match="same hidden size"):
        distill(teacher, student, data(), DistillConfig(steps=1, hidden_weight=1.0), tmp_path, progress=False)
    same_width = tiny_model("llama", seed=3, num_hidden_layers=1)
    config = DistillConfig(steps=2, batch_size=2, hidden_weight=0.5, save_every=0)
    result = distill(teacher, same_width, data(), config, tmp_path / "h", progress=False)
    assert len(result.losses) == 2
    with pytest.raises(DistillError, match="vocabularies"):
        distill(teacher, tiny_model("llama", vocab_size=400), data(), config, tmp_path / "v", progress=False)
