import json

import pytest
import torch
from diffusers import DiTTransformer2DModel, FlowMatchEulerDiscreteScheduler

from slimserve.diffusion import distill
from slimserve.diffusion.class_pipeline import ClassConditionalFlowPipeline
from slimserve.diffusion.config import DistillationError, DistillConfig
from slimserve.diffusion.distill import distill_steps


def tiny_teacher(folder):
    torch.manual_seed(0)
    transformer = DiTTransformer2DModel(
        num_attention_heads=2,
        attention_head_dim=8,
        in_channels=3,
        out_channels=3,
        num_layers=2,
        sample_size=8,
        patch_size=2,
        num_embeds_ada_norm=5,
        norm_num_groups=1,
    )
    ClassConditionalFlowPipeline(transformer.eval(), FlowMatchEulerDiscreteScheduler(shift=1.0)).save_pretrained(folder)
    return folder


CONFIG = dict(student_steps=2, substeps=3, num_trajectories=8, train_steps=6, batch_size=4, checkpoint_every=3)


def test_distilled_student_loads_as_pipeline_and_resumes_exactly(tmp_path, monkeypatch):
    teacher = tiny_teacher(tmp_path / "teacher")
    config = DistillConfig(**CONFIG)
    straight = distill_steps(teacher, tmp_path / "straight", config)

    save = distill._save_checkpoint

    def interrupted(folder, component, student, optimizer, step, losses):
        save(folder, component, student, optimizer, step, losses)
        if step == 3:
            raise KeyboardInterrupt

    monkeypatch.setattr(distill, "_save_checkpoint", interrupted)
    with pytest.raises(KeyboardInterrupt):
        distill_steps(teacher, tmp_path / "resumed", config)
    assert not (tmp_path / "resumed").exists()
    monkeypatch.setattr(distill, "_save_checkpoint", save)
    resumed = distill_steps(teacher, tmp_path / "resumed", config)

    a = ClassConditionalFlowPipeline.from_pretrained(straight).transformer.state_dict()
    b = ClassConditionalFlowPipeline.from_pretrained(resumed).transformer.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    before = ClassConditionalFlowPipeline.from_pretrained(teacher).transformer.state_dict()
    assert not all(torch.equal(a[k], before[k]) for k in a)
    recipe = json.loads((resumed / "distillation.json").read_text())
    assert recipe["num_inference_steps"] == 2 and recipe["guidance_scale"] == 1.0

    pipe = ClassConditionalFlowPipeline.from_pretrained(resumed)
    pipe.set_progress_bar_config(disable=True)
    images = pipe([0, 4], num_inference_steps=2, generator=torch.Generator().manual_seed(0)).images
    assert images.shape == (2, 3, 8, 8) and torch.isfinite(images).all()


def test_student_fits_teacher_trajectory_better_than_teacher_few_steps(tmp_path):
    """On the trained trajectories the student's 2-step Euler lands closer to the guided teacher than the teacher's
    own 2-step Euler does."""
    teacher_dir = tiny_teacher(tmp_path / "teacher")
    config = DistillConfig(**{**CONFIG, "train_steps": 60, "checkpoint_every": 60, "lr": 3e-3})
    student_dir = distill_steps(teacher_dir, tmp_path / "student", config)
    teacher = ClassConditionalFlowPipeline.from_pretrained(teacher_dir)
    data = torch.load(tmp_path / "student.work" / "trajectories.pt")
    noise, target, labels = data["states"][:, 0], data["states"][:, -1], data["conditions"]
    student = ClassConditionalFlowPipeline.from_pretrained(student_dir)
    for pipe in (teacher, student):
        pipe.set_progress_bar_config(disable=True)
    naive = teacher(labels, 2, guidance_scale=config.guidance_scale, latents=noise, output_type="latent").images
    distilled = student(labels, 2, latents=noise, output_type="latent").images
    assert ((distilled - target) ** 2).mean() < 0.5 * ((naive - target) ** 2).mean()


def test_bad_settings_and_missing_teacher_are_one_line_errors(tmp_path):
    with pytest.raises(DistillationError, match="student_steps"):
        DistillConfig(student_steps=0)
    with pytest.raises(DistillationError, match="model_index.json"):
        distill_steps(tmp_path, tmp_path / "out", DistillConfig())
