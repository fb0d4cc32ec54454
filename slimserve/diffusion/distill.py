"""Step distillation by teacher-trajectory regression (as InstaFlow/reflow regress straight paths): the teacher,
with classifier-free guidance, integrates the flow ODE finely from fixed noise; the student learns to cover each of
its few Euler steps (on exactly the sigmas its scheduler uses at inference) in one model call, with the guidance
baked in, so it samples with guidance_scale 1 and one model call per step.

Resumable: the teacher trajectories and every checkpoint (student in the diffusers layout plus optimizer state)
stay in `<output>.work/`; the finished student pipeline is renamed into `<output>` at the end.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
from dataclasses import asdict
from pathlib import Path

import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from tqdm import tqdm

from slimserve.diffusion.class_pipeline import ClassConditionalFlowPipeline
from slimserve.diffusion.config import DistillationError, DistillConfig


def student_sigmas(pipe: ClassConditionalFlowPipeline, steps: int) -> torch.Tensor:
    """The sigmas the student's scheduler visits at inference (steps + 1 values, ending at 0)."""
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config)
    scheduler.set_timesteps(steps)
    return scheduler.sigmas.float()


@torch.no_grad()
def teacher_trajectories(
    pipe: ClassConditionalFlowPipeline, config: DistillConfig, sigmas: torch.Tensor
) -> dict[str, torch.Tensor]:
    """States (N, steps + 1, C, H, W) of the guided teacher at the student's sigmas, from seeded noise and labels."""
    generator = torch.Generator().manual_seed(config.seed)
    model_config = pipe.transformer.config
    shape = (config.num_trajectories, model_config.in_channels, model_config.sample_size, model_config.sample_size)
    noise = torch.randn(shape, generator=generator)
    labels = torch.randint(0, pipe.null_class, (config.num_trajectories,), generator=generator)
    device = pipe.transformer.device
    states = torch.empty(len(noise), len(sigmas), *shape[1:])
    for start in tqdm(range(0, len(noise), config.batch_size), desc="teacher trajectories"):
        x = noise[start : start + config.batch_size].to(device)
        y = labels[start : start + config.batch_size].to(device)
        states[start : start + len(x), 0] = x.cpu()
        for i in range(len(sigmas) - 1):
            fine = torch.linspace(float(sigmas[i]), float(sigmas[i + 1]), config.substeps + 1)
            for s, s_next in zip(fine[:-1], fine[1:]):
                timestep = (s * 1000).reshape(1).to(device)
                x = x + (s_next - s) * pipe.velocity(x, timestep, y, config.guidance_scale)
            states[start : start + len(x), i + 1] = x.cpu()
    return {"states": states, "labels": labels}


def _save_checkpoint(folder: Path, student, optimizer, step: int) -> None:
    temporary = folder.with_name(folder.name + ".partial")
    shutil.rmtree(temporary, ignore_errors=True)
    student.save_pretrained(temporary / "transformer")
    torch.save({"optimizer": optimizer.state_dict(), "step": step}, temporary / "training_state.pt")
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(temporary, folder)


def distill_steps(teacher_dir: str | Path, output: str | Path, config: DistillConfig, device: str = "cpu") -> Path:
    """Distill the class-conditional flow pipeline in `teacher_dir` into a `student_steps`-step student."""
    teacher_dir, output = Path(teacher_dir), Path(output)
    if not (teacher_dir / "model_index.json").exists():
        raise DistillationError(f"{teacher_dir}: no diffusers pipeline (model_index.json missing)")
    if output.exists():
        raise DistillationError(f"{output} already exists; choose another output folder")
    pipe = ClassConditionalFlowPipeline.from_pretrained(teacher_dir).to(device)
    pipe.set_progress_bar_config(disable=True)
    pipe.transformer.eval()
    work = output.with_name(output.name + ".work")
    work.mkdir(parents=True, exist_ok=True)
    settings = work / "distill_config.json"
    if settings.exists() and json.loads(settings.read_text()) != asdict(config):
        raise DistillationError(f"{work} holds a run with other settings; remove it or use the same settings")
    settings.write_text(json.dumps(asdict(config), indent=2))

    sigmas = student_sigmas(pipe, config.student_steps)
    cache = work / "trajectories.pt"
    if not cache.exists():
        torch.save(teacher_trajectories(pipe, config, sigmas), cache)
    data = torch.load(cache)

    student = copy.deepcopy(pipe.transformer)
    optimizer = torch.optim.AdamW(student.parameters(), lr=config.lr, weight_decay=0.0)
    step = 0
    checkpoints = sorted(work.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    if checkpoints:
        latest = checkpoints[-1]
        student = type(student).from_pretrained(latest / "transformer").to(device)
        optimizer = torch.optim.AdamW(student.parameters(), lr=config.lr, weight_decay=0.0)
        state = torch.load(latest / "training_state.pt", map_location=device)
        optimizer.load_state_dict(state["optimizer"])
        step = state["step"]
    student.eval()  # eval mode: the label embedding must not drop labels, guidance is distilled in
    states, labels = data["states"], data["labels"]
    count, intervals = states.shape[0], len(sigmas) - 1
    progress = tqdm(total=config.train_steps, initial=step, desc="distill-steps")
    while step < config.train_steps:
        generator = torch.Generator().manual_seed(config.seed * 1_000_003 + step)  # a resumed run draws the same
        index = torch.randint(0, count, (config.batch_size,), generator=generator)
        interval = torch.randint(0, intervals, (config.batch_size,), generator=generator)
        x, x_next = states[index, interval].to(device), states[index, interval + 1].to(device)
        s, s_next = sigmas[interval].to(device), sigmas[interval + 1].to(device)
        target = (x_next - x) / (s_next - s)[:, None, None, None]
        prediction = student(x, timestep=s * 1000, class_labels=labels[index].to(device)).sample
        loss = ((prediction - target) ** 2).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        optimizer.step()
        step += 1
        progress.update(1)
        progress.set_postfix(loss=f"{loss.item():.4f}", refresh=False)
        if step % config.checkpoint_every == 0 or step == config.train_steps:
            _save_checkpoint(work / f"checkpoint-{step}", student, optimizer, step)
    progress.close()

    result = ClassConditionalFlowPipeline(
        student.cpu().eval(), FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config)
    )
    temporary = output.with_name(output.name + ".partial")
    shutil.rmtree(temporary, ignore_errors=True)
    result.save_pretrained(temporary)
    recipe = {"num_inference_steps": config.student_steps, "guidance_scale": 1.0, "distilled_from": str(teacher_dir)}
    (temporary / "distillation.json").write_text(json.dumps({**recipe, "config": asdict(config)}, indent=2))
    os.replace(temporary, output)
    return output
