"""`slimserve distill --teacher BIG --student SMALL --data generic|self|FILE --out DIR`."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from slimserve.compress.loading import load_causal_lm
from slimserve.compress.prune.rebuild import save_folder
from slimserve.config import parse_dtype
from slimserve.distill.config import DistillConfig, DistillError
from slimserve.distill.data import distill_data
from slimserve.distill.loop import distill

FINAL = "model"


def add_distill_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "distill",
        help="train a (pruned or converted) student to match a teacher's logits",
        description="Logit KL distillation (plus an optional hidden-state loss). Checkpoints go to OUT/checkpoints "
        "and a rerun with the same OUT resumes from the newest; the trained student is written to OUT/model.",
    )
    p.add_argument("--teacher", required=True, help="teacher model folder or .gguf file")
    p.add_argument("--student", required=True, help="student model folder (same tokenizer)")
    p.add_argument("--data", default="generic", help="generic (shipped corpus), self (teacher-written) or a text file")
    p.add_argument("--out", required=True, help="run folder (checkpoints and the final model)")
    p.add_argument("--rows", type=int, default=512, help="training sequences to prepare (default 512)")
    p.add_argument("--seq-len", type=int, default=512, help="tokens per sequence (default 512)")
    p.add_argument("--steps", type=int, default=500)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--hidden-weight", type=float, default=0.0, help="weight of the final-hidden-state loss")
    p.add_argument("--save-every", type=int, default=100, help="steps between checkpoints")
    p.add_argument("--max-minutes", type=float, help="stop (with a checkpoint) after this much training")
    p.add_argument("--no-gradient-checkpointing", action="store_true")
    p.add_argument("--no-resume", action="store_true", help="ignore checkpoints already in OUT")
    p.add_argument("--device", help="training device (default: cuda when available)")
    p.set_defaults(func=run_distill)
    return p


def run_distill(args: argparse.Namespace) -> int:
    out = Path(args.out)
    if (out / FINAL).exists():
        raise DistillError(f"{out / FINAL}: this run is finished; choose a new --out")
    if not out.parent.exists():
        raise DistillError(f"{out.parent}: parent folder of the output does not exist")
    config = DistillConfig(
        steps=args.steps, batch_size=args.batch_size, lr=args.lr, temperature=args.temperature,
        hidden_weight=args.hidden_weight, save_every=args.save_every,
        max_seconds=None if args.max_minutes is None else args.max_minutes * 60,
        gradient_checkpointing=not args.no_gradient_checkpointing,
    )  # fmt: skip
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    teacher, tokenizer = load_causal_lm(args.teacher, parse_dtype("auto", device))
    student, student_tokenizer = load_causal_lm(args.student, torch.float32)
    teacher.to(device)
    student.to(device)
    data = distill_data(args.data, teacher, tokenizer, args.rows, args.seq_len, device)
    out.mkdir(exist_ok=True)
    result = distill(teacher, student, data, config, out, resume=not args.no_resume)
    done = result.steps >= config.steps
    if done:
        save_folder(student, out / FINAL, student_tokenizer or tokenizer)
    first, last = result.losses[:1], result.losses[-1:]
    summary = {"steps": result.steps, "of": config.steps, "resumed_from": result.resumed_from,
               "first_loss": first[0] if first else None, "last_loss": last[0] if last else None,
               "seconds": round(result.seconds, 1), "model": str(out / FINAL) if done else None}  # fmt: skip
    print(json.dumps(summary))
    return 0
