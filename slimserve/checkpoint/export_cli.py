"""`slimserve export-gguf MODEL OUT.gguf --type q8_0|q4_0|f16`."""

from __future__ import annotations

import argparse


def add_export_gguf_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser("export-gguf", help="write a model as a GGUF file for llama.cpp and other edge runtimes")
    p.add_argument("model", help="Hugging Face model folder, .gguf file, or a built-in name (default, smollm2-135m)")
    p.add_argument("out", help="output .gguf file (must not exist)")
    p.add_argument("--type", default="q8_0", choices=["q8_0", "q4_0", "f16"], help="storage of 2-D weights")
    p.set_defaults(func=run_export_gguf)
    return p


def run_export_gguf(args: argparse.Namespace) -> None:
    from slimserve.checkpoint.gguf_export import export_gguf

    written = export_gguf(args.model, args.out, args.type)
    print(f"wrote {args.out} ({len(written)} tensors, {args.type})")
