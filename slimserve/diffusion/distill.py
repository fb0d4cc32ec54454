"""Step distillation by teacher-trajectory regression (as InstaFlow/reflow regress straight paths): the teacher,
with classifier-free guidance, integrates the sampling ODE finely from fixed noise; the student learns to cover each
of its few sampler steps (on exactly the levels its scheduler uses at inference) in one model call, with the guidance
baked in, so it samples with guidance_scale 1 and one model call per step. Every sampler step is affine,
x_next = a * x + b * output (flow Euler, deterministic DDIM), so the regression target is the output that lands the
step on the teacher's state. What differs per pipeline kind lives in distill_adapters.py.

Resumable: the teacher trajectories and every checkpoint (student in the diffusers layout plus optimizer state and
loss history) stay in `<output>.work/`; the finished student pipeline is renamed into `<output>` at the end.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
from dataclasses import asdict
from pathlib import Path

import torch
from tqdm import tqdm

from slimserve.diffusion.config import DistillationError, DistillConfig
from slimserve.diffusion.distill_adapters import Adapter, load_adapter


@torch.no_grad()
def teacher_trajectories(adapter: Adapter, levels: torch.Tensor) -> dict[str, torch.Tensor]:
    """States (N, steps + 1, ...) of the guided teacher at the student's levels, from seeded noise and conditions."""
    config = adapter.config
    noise, conditions = adapter.noise_and_conditions(
        config.num_trajectories, torch.Generator().manual_seed(config.seed)
    )
    states = torch.empty(len(noise), len(levels), *noise.shape[1:])
    for start in tqdm(range(0, len(noise), config.batch_size), desc="teacher trajectories"):
        x = noise[start : start + config.batch_size].to(adapter.device)
        cond = conditions[start : start + config.batch_size].to(adapter.device)
        states[start : start + len(x), 0] = x.cpu()
        for i in range(len(levels) - 1):
            fine = adapter.fine_levels(float(levels[i]), float(levels[i + 1]))
            for level, next_level in zip(fine[:-1].tolist(), fine[1:].tolist()):
                a, b = adapter.step(torch.tensor([level]), torch.tensor([next_level]))
                x = a.item() * x + b.item() * adapter.teacher(x, level, cond)
            states[start : start + len(x), i + 1] = x.cpu()
    return {"states": states, "conditions": conditions}


def _save_checkpoint(folder: Path, component: str, student, optimizer, step: int, losses: list[float]) -> None:
    temporary = folder.with_name(folder.name + ".partial")
    shutil.rmtree(temporary, ignore_errors=True)
    student.save_pretrained(temporary / component)
    torch.save({"optimizer": optimizer.state_dict(), "step": step, "losses": losses}, temporary / "training_state.pt")
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(temporary, folder)


def _batch_shape(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return values.reshape(-1, *([1] * (like.ndim - 1)))


def distill_steps(
    teacher_dir: str | Path,
    output: str | Path,
    config: DistillConfig,
    device: str = "cpu",
    captions: list[str] | None = None,
) -> Path:
    """Distill the guided pipeline in `teacher_dir` (class flow, Flux-style or Stable Diffusion UNet) into a
    `student_steps`-step student; text pipelines are conditioned on `captions`."""
    teacher_dir, output, captions = Path(teacher_dir), Path(output), list(captions or [])
    if output.exists():
        raise DistillationError(f"{output} already exists; choose another output folder")
    adapter = load_adapter(teacher_dir, config, captions, device)
    work = output.with_name(output.name + ".work")
    work.mkdir(parents=True, exist_ok=True)
    settings_file, settings = work / "distill_config.json", {**asdict(config), "captions": captions}
    if settings_file.exists() and json.loads(settings_file.read_text()) != settings:
        raise DistillationError(f"{work} holds a run with other settings; remove it or use the same settings")
    settings_file.write_text(json.dumps(settings, indent=2))

    levels = adapter.levels()
    cache = work / "trajectories.pt"
    if not cache.exists():
        torch.save(teacher_trajectories(adapter, levels), cache)
    data = torch.load(cache)

    student = copy.deepcopy(adapter.model)
    optimizer = torch.optim.AdamW(student.parameters(), lr=config.lr, weight_decay=0.0)
    step, losses = 0, []
    checkpoints = sorted(work.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    if checkpoints:
        latest = checkpoints[-1]
        student = type(student).from_pretrained(latest / adapter.component).to(device)
        optimizer = torch.optim.AdamW(student.parameters(), lr=config.lr, weight_decay=0.0)
        state = torch.load(latest / "training_state.pt", map_location=device)
        optimizer.load_state_dict(state["optimizer"])
        step, losses = state["step"], state["losses"]
    student.eval()  # eval mode: no label/caption dropout, guidance is distilled in
    states, conditions = data["states"], data["conditions"]
    count, intervals = states.shape[0], len(levels) - 1
    progress = tqdm(total=config.train_steps, initial=step, desc="distill-steps")
    while step < config.train_steps:
        generator = torch.Generator().manual_seed(config.seed * 1_000_003 + step)  # a resumed run draws the same
        index = torch.randint(0, count, (config.batch_size,), generator=generator)
        interval = torch.randint(0, intervals, (config.batch_size,), generator=generator)
        x, x_next = states[index, interval].to(device), states[index, interval + 1].to(device)
        level, next_level = levels[interval].to(device), levels[interval + 1].to(device)
        a, b = adapter.step(level, next_level)
        target = (x_next - _batch_shape(a, x) * x) / _batch_shape(b, x)  # the output that lands on x_next
        prediction = adapter.student(student, x, level, conditions[index].to(device))
        loss = ((prediction - target) ** 2).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        optimizer.step()
        step += 1
        losses.append(loss.item())
        progress.update(1)
        progress.set_postfix(loss=f"{losses[-1]:.4f}", refresh=False)
        if step % config.checkpoint_every == 0 or step == config.train_steps:
            _save_checkpoint(work / f"checkpoint-{step}", adapter.component, student, optimizer, step, losses)
    progress.close()

    result = adapter.student_pipeline(student.cpu().eval())
    temporary = output.with_name(output.name + ".partial")
    shutil.rmtree(temporary, ignore_errors=True)
    result.save_pretrained(temporary)
    recipe = {**adapter.recipe(), "distilled_from": str(teacher_dir)}
    document = {**recipe, "config": asdict(config), "captions": captions, "losses": losses}
    (temporary / "distillation.json").write_text(json.dumps(document, indent=2))
    os.replace(temporary, output)
    return output
