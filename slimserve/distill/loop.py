"""The distillation loop shared by every student (pruned, GQA-converted, ...): the teacher's logits are the
target, AdamW with warmup and cosine decay updates the student, bf16 autocast on CUDA (fp32 master weights),
fp32 on the CPU, gradient checkpointing, resumable checkpoints and a progress bar with the loss."""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from slimserve.distill.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from slimserve.distill.config import DistillConfig, DistillError
from slimserve.distill.loss import hidden_cosine, logit_kl


@dataclass
class DistillResult:
    steps: int
    seconds: float
    tokens: int
    losses: list[float] = field(default_factory=list)  # per step
    resumed_from: int = 0


def _lr_at(step: int, config: DistillConfig) -> float:
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    progress = (step - config.warmup_steps) / max(config.steps - config.warmup_steps, 1)
    floor = config.lr * config.min_lr_ratio
    return floor + (config.lr - floor) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


def _batch(data: torch.Tensor, step: int, config: DistillConfig) -> torch.Tensor:
    """The rows of step `step`: a fixed random order per epoch, so that a resumed run sees the same batches."""
    per_epoch = max(data.shape[0] // config.batch_size, 1)
    epoch, index = divmod(step, per_epoch)
    order = torch.randperm(data.shape[0], generator=torch.Generator().manual_seed(config.seed + epoch))
    rows = order[index * config.batch_size : (index + 1) * config.batch_size]
    return data[rows]


def _checkpointing(model: nn.Module):
    """(enable, disable) of activation checkpointing under the name this transformers version uses."""
    for prefix in ("activation", "gradient"):
        on, off = (
            getattr(model, f"{prefix}_checkpointing_enable", None),
            getattr(model, f"{prefix}_checkpointing_disable", None),
        )
        if on is not None and off is not None:
            return on, off
    return None


def _check_pair(teacher: nn.Module, student: nn.Module, config: DistillConfig) -> None:
    tv, sv = teacher.config.vocab_size, student.config.vocab_size
    if tv != sv:
        raise DistillError(f"teacher and student vocabularies differ ({tv} vs {sv})")
    if config.hidden_weight and teacher.config.hidden_size != student.config.hidden_size:
        raise DistillError("the hidden-state loss needs teacher and student of the same hidden size")


def distill(
    teacher: nn.Module,
    student: nn.Module,
    data: torch.Tensor,
    config: DistillConfig,
    out: str | Path,
    *,
    resume: bool = True,
    progress: bool = True,
) -> DistillResult:
    """Train `student` (in place, on its device) to match `teacher` on `data` (rows of token ids).

    Checkpoints go to out/checkpoints; with `resume`, the newest one is loaded first and training goes on
    from its step."""
    _check_pair(teacher, student, config)
    out = Path(out)
    device = next(student.parameters()).device
    if data.ndim != 2 or data.shape[0] < 1:
        raise DistillError("distillation data must be a (rows, seq_len) tensor of token ids")
    torch.manual_seed(config.seed)
    teacher.eval().requires_grad_(False)
    student.train()
    checkpointing = _checkpointing(student) if config.gradient_checkpointing else None
    if checkpointing is not None:
        checkpointing[0]()
    params = [p for p in student.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay, betas=(0.9, 0.95))
    start_step, losses = 0, []
    ckpt = latest_checkpoint(out) if resume else None
    if ckpt is not None:
        state = load_checkpoint(ckpt, student, optimizer)
        start_step, losses = state["step"], state["losses"]
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()
    want_hidden = config.hidden_weight > 0
    began = time.perf_counter()
    step = start_step
    bar = tqdm(range(start_step, config.steps), desc="distilling", initial=start_step, total=config.steps,
               disable=not progress)  # fmt: skip
    for step in bar:
        ids = _batch(data, step, config).to(device)
        for group in optimizer.param_groups:
            group["lr"] = _lr_at(step, config)
        with torch.no_grad(), autocast:
            t_out = teacher(input_ids=ids, use_cache=False, output_hidden_states=want_hidden)
        with autocast:
            s_out = student(input_ids=ids, use_cache=False, output_hidden_states=want_hidden)
        loss = logit_kl(s_out.logits, t_out.logits, config.temperature)
        if want_hidden:
            loss = loss + config.hidden_weight * hidden_cosine(s_out.hidden_states[-1], t_out.hidden_states[-1])
        if not torch.isfinite(loss):
            raise DistillError(f"non-finite loss at step {step}; lower the learning rate")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if config.grad_clip:
            torch.nn.utils.clip_grad_norm_(params, config.grad_clip)
        optimizer.step()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{losses[-1]:.4f}", lr=f"{_lr_at(step, config):.1e}")
        done = step + 1
        out_of_time = config.max_seconds is not None and time.perf_counter() - began >= config.max_seconds
        if (config.save_every and done % config.save_every == 0) or done == config.steps or out_of_time:
            save_checkpoint(out, student, optimizer, {"step": done, "losses": losses, "config": config.to_dict()})
        if out_of_time:
            break
    bar.close()
    student.eval()
    if checkpointing is not None:
        checkpointing[1]()
    steps_done = len(losses) - start_step
    seconds = time.perf_counter() - began
    return DistillResult(start_step + steps_done, seconds, steps_done * data.shape[1] * config.batch_size, losses,
                         start_step)  # fmt: skip
