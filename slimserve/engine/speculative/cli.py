"""`slimserve train-draft MODEL --out DIR`: the EAGLE-style draft head for speculative decoding."""

from __future__ import annotations

import argparse


def add_train_draft_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "train-draft",
        help="train a draft head (EAGLE-style) for speculative decoding on text the model generates itself",
    )
    p.add_argument("model", help="HF model folder, .gguf file, or a built-in name")
    p.add_argument("--out", required=True, help="output folder of the draft head (must not exist)")
    p.add_argument("--num-samples", type=int, default=256, help="self-generated sequences to train on")
    p.add_argument("--seq-len", type=int, default=256, help="tokens per sequence (prompt + continuation)")
    p.add_argument("--temperature", type=float, default=0.7, help="sampling temperature of the self-generated text")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=8, help="sequences per optimizer step")
    p.add_argument("--lr", type=float, default=1e-3, help="peak learning rate (warm-up, then cosine decay)")
    p.add_argument("--checkpoint-every", type=int, default=50, help="optimizer steps between checkpoints")
    p.add_argument("--resume", action="store_true", help="continue from OUT.work/ (data and last checkpoint)")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--save-dtype", default="float32", help="dtype of the saved head: float32, bfloat16, float16")
    p.set_defaults(func=cmd_train_draft)
    return p


def cmd_train_draft(args: argparse.Namespace) -> None:
    from slimserve.engine.speculative.train import TrainDraftConfig, train_draft_head

    config = TrainDraftConfig(
        model=args.model,
        out=args.out,
        num_samples=args.num_samples,
        seq_len=args.seq_len,
        temperature=args.temperature,
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        checkpoint_every=args.checkpoint_every,
        resume=args.resume,
        seed=args.seed,
        device=args.device,
        save_dtype=args.save_dtype,
    )
    print(train_draft_head(config))
