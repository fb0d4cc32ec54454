"""Step distillation of text-conditioned pipelines (Flux-style transformer, Stable Diffusion UNet) on tiny random
pipelines with tiny random text encoders: the loss falls, the student folder loads with diffusers and its few-step
unguided sampling lands closer to the guided teacher's trajectory than the teacher's own few steps, runs resume."""

import json

import pytest
import torch
from diffusers import DDIMScheduler, DiffusionPipeline

from slimserve.diffusion import distill
from slimserve.diffusion.config import DistillationError, DistillConfig
from slimserve.diffusion.distill import distill_steps
from tests.diffusion.tiny_pipelines import flux_with_text, sd_with_text

CAPTIONS = ["a photo of a cat", "a red house", "a blue tree in the painting"]
CONFIG = dict(student_steps=2, substeps=3, num_trajectories=12, batch_size=6, guidance_scale=4.0)
SIZE = dict(height=16, width=16, max_sequence_length=8)


def _sample(pipe, prompts, noise, steps, guidance, kind):
    pipe.set_progress_bar_config(disable=True)
    common = dict(prompt=prompts, latents=noise, num_inference_steps=steps, output_type="latent", height=16, width=16)
    if kind == "flux_dev":  # the guidance is an embedding input: teacher and student both take it
        return pipe(**common, max_sequence_length=8, guidance_scale=CONFIG["guidance_scale"]).images
    if kind == "flux":  # schnell-style Flux: true CFG against the empty caption
        guided = dict(true_cfg_scale=guidance, negative_prompt=[""] * len(prompts)) if guidance > 1 else {}
        return pipe(**common, max_sequence_length=8, **guided).images
    return pipe(**common, guidance_scale=guidance).images


def sd_v_prediction():
    pipe = sd_with_text()
    pipe.register_modules(scheduler=DDIMScheduler.from_config(pipe.scheduler.config, prediction_type="v_prediction"))
    return pipe


BUILDS = {
    "flux": flux_with_text,
    "flux_dev": lambda: flux_with_text(guidance_embeds=True),
    "sd_unet": sd_with_text,
    "sd_unet_v": sd_v_prediction,
}


@pytest.mark.parametrize("kind", sorted(BUILDS))
def test_text_student_learns_the_guided_trajectory_in_few_steps(tmp_path, kind):
    torch.manual_seed(0)
    BUILDS[kind]().save_pretrained(tmp_path / "teacher")
    config = DistillConfig(**CONFIG, **SIZE, train_steps=80, checkpoint_every=80, lr=3e-3)
    student_dir = distill_steps(tmp_path / "teacher", tmp_path / "student", config, captions=CAPTIONS)

    recipe = json.loads((student_dir / "distillation.json").read_text())
    guidance = CONFIG["guidance_scale"] if kind == "flux_dev" else 1.0  # dev-style keeps its guidance embedding
    assert recipe["num_inference_steps"] == 2 and recipe["guidance_scale"] == guidance
    losses = recipe["losses"]
    assert len(losses) == 80 and sum(losses[-10:]) < 0.5 * sum(losses[:10])

    data = torch.load(tmp_path / "student.work" / "trajectories.pt")
    noise, target = data["states"][:, 0], data["states"][:, -1]
    prompts = [CAPTIONS[i] for i in data["conditions"]]
    teacher, student = (
        DiffusionPipeline.from_pretrained(tmp_path / "teacher"),
        DiffusionPipeline.from_pretrained(student_dir),
    )
    naive = _sample(teacher, prompts, noise, 2, config.guidance_scale, kind)
    distilled = _sample(student, prompts, noise, 2, 1.0, kind)
    assert ((distilled - target) ** 2).mean() < 0.5 * ((naive - target) ** 2).mean()
    images = student(
        prompt=CAPTIONS[:2], num_inference_steps=2, guidance_scale=guidance, height=16, width=16, output_type="pt"
    ).images
    assert images.shape == (2, 3, 16, 16) and torch.isfinite(images).all()


def test_text_run_resumes_from_its_checkpoint(tmp_path, monkeypatch):
    sd_with_text().save_pretrained(tmp_path / "teacher")
    config = DistillConfig(**CONFIG, **SIZE, train_steps=4, checkpoint_every=2)
    straight = distill_steps(tmp_path / "teacher", tmp_path / "straight", config, captions=CAPTIONS)
    save = distill._save_checkpoint

    def interrupted(folder, component, student, optimizer, step, losses):
        save(folder, component, student, optimizer, step, losses)
        if step == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(distill, "_save_checkpoint", interrupted)
    with pytest.raises(KeyboardInterrupt):
        distill_steps(tmp_path / "teacher", tmp_path / "resumed", config, captions=CAPTIONS)
    monkeypatch.setattr(distill, "_save_checkpoint", save)
    resumed = distill_steps(tmp_path / "teacher", tmp_path / "resumed", config, captions=CAPTIONS)
    a = DiffusionPipeline.from_pretrained(straight).unet.state_dict()
    b = DiffusionPipeline.from_pretrained(resumed).unet.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    losses = [json.loads((folder / "distillation.json").read_text())["losses"] for folder in (straight, resumed)]
    assert losses[0] == losses[1] and len(losses[0]) == 4


def test_bad_teachers_are_one_line_errors(tmp_path):
    sd_with_text().save_pretrained(tmp_path / "teacher")
    with pytest.raises(DistillationError, match="give captions"):
        distill_steps(tmp_path / "teacher", tmp_path / "out", DistillConfig(**CONFIG))
    (tmp_path / "teacher" / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"not weights")
    with pytest.raises(DistillationError, match="cannot load the teacher pipeline") as error:
        distill_steps(tmp_path / "teacher", tmp_path / "out", DistillConfig(**CONFIG), captions=CAPTIONS)
    assert "\n" not in str(error.value)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "model_index.json").write_text(json.dumps({"_class_name": "KandinskyPipeline"}))
    with pytest.raises(DistillationError, match="cannot be step-distilled"):
        distill_steps(tmp_path / "other", tmp_path / "out", DistillConfig(**CONFIG))
    assert not (tmp_path / "out").exists()
