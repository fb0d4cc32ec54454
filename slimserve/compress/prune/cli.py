"""`slimserve prune` (unstructured/N:M sparsity or structured pruning) and `slimserve convert-gqa`."""

from __future__ import annotations

import argparse
import json
import time

import torch

from slimserve.compress.cli import calibration_samples
from slimserve.compress.configs import preset
from slimserve.compress.errors import QuantConfigError
from slimserve.compress.loading import load_causal_lm
from slimserve.compress.prune.api import prune_
from slimserve.compress.prune.config import PRUNE_METHODS, SparsityConfig
from slimserve.compress.prune.gqa import convert_gqa
from slimserve.compress.prune.importance import estimate_importance
from slimserve.compress.prune.rebuild import check_supported, count_parameters, save_folder
from slimserve.compress.prune.save import save_pruned
from slimserve.compress.prune.structured import (
    apply_structured,
    parse_param_count,
    shape_for_target,
    shape_from_ratios,
)
from slimserve.compress.recipe import CalibrationSpec
from slimserve.compress.writer import check_output
from slimserve.config import parse_dtype


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="Hugging Face model folder or .gguf file")
    p.add_argument("--out", required=True, help="output folder (must not exist)")
    p.add_argument("--calib", default="generic", help="calibration text: generic, self (model-written) or a file")
    p.add_argument("--num-samples", type=int, default=64, help="calibration sequences (default 64)")
    p.add_argument("--seq-len", type=int, default=512, help="tokens per calibration sequence (default 512)")
    p.add_argument("--device", help="calibration device (default: cuda when available)")
    p.add_argument("--dtype", default="auto", help="weights dtype while pruning (auto: bf16 on CUDA, fp32 on CPU)")


def add_prune_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "prune",
        help="sparsify (magnitude/Wanda/SparseGPT, unstructured or 2:4) or structurally shrink a model",
        description="Without structural options: zero weights (--method, --sparsity or --structure 2:4) and write a "
        "compressed-tensors checkpoint. With --target-params, --drop-layers, --mlp-ratio, --hidden-ratio or "
        "--heads: remove heads, channels and layers by activation importance and write a smaller ordinary model.",
    )
    _add_common(p)
    g = p.add_argument_group("sparsity")
    g.add_argument("--method", choices=PRUNE_METHODS, default="sparsegpt", help="pruning rule (default sparsegpt)")
    g.add_argument("--sparsity", type=float, default=0.5, help="fraction of each row's weights zeroed (default 0.5)")
    g.add_argument("--structure", default="unstructured", help="'unstructured' or N:M such as 2:4")
    g.add_argument("--quantize", choices=["W4A16", "W8A16"], help="SparseGPT: also quantize the kept weights")
    g.add_argument("--group-size", type=int, help="quantization group size (default 128; 0 for per-channel)")
    s = p.add_argument_group("structured")
    s.add_argument("--target-params", help="shrink MLP and embedding width to at most this many parameters (0.7B)")
    s.add_argument("--drop-layers", type=int, default=0, help="remove the N layers of lowest block importance")
    s.add_argument("--mlp-ratio", type=float, help="keep this fraction of the MLP channels")
    s.add_argument("--hidden-ratio", type=float, help="keep this fraction of the embedding channels")
    s.add_argument("--heads", type=int, help="attention heads to keep (a multiple of the KV heads)")
    p.set_defaults(func=run_prune)
    return p


def add_convert_gqa_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "convert-gqa", help="mean-pool key/value heads into fewer (GQA/MQA); recover with `slimserve distill`"
    )
    p.add_argument("model", help="Hugging Face model folder or .gguf file")
    p.add_argument("--out", required=True, help="output folder (must not exist)")
    p.add_argument("--kv-heads", type=int, required=True, help="new number of key/value heads (1 = MQA)")
    p.set_defaults(func=run_convert_gqa)
    return p


def _structured(args: argparse.Namespace) -> bool:
    return any(v is not None for v in (args.target_params, args.mlp_ratio, args.hidden_ratio, args.heads)) or bool(
        args.drop_layers
    )


def run_prune(args: argparse.Namespace) -> int:
    out = check_output(args.out)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    structured = _structured(args)
    if (
        structured
        and args.target_params is not None
        and any(v is not None for v in (args.mlp_ratio, args.hidden_ratio, args.heads))
    ):
        raise QuantConfigError("--target-params chooses the widths itself: drop --mlp-ratio/--hidden-ratio/--heads")
    config = None
    if not structured:
        quant = None
        if args.quantize:
            gs = 128 if args.group_size is None else (args.group_size or None)
            quant = preset(args.quantize, group_size=gs)
        config = SparsityConfig(args.method, args.sparsity, args.structure, quant=quant)
    model, tokenizer = load_causal_lm(args.model, parse_dtype(args.dtype, device))
    if structured:
        check_supported(model)
    spec = CalibrationSpec(source=args.calib, num_samples=args.num_samples, seq_len=args.seq_len)
    needs = structured or config.needs_calibration
    calibration = calibration_samples(spec, model, tokenizer, device) if needs else None
    start = time.perf_counter()
    if not structured:
        report = prune_(model, config, calibration, device=device)
        save_pruned(model, config, out, tokenizer, report)
        sparsity = report.scheme["global_sparsity"]
        print(
            f"wrote {out} ({config.method}, {config.structure}, {sparsity:.1%} zeros) "
            f"in {time.perf_counter() - start:.1f}s"
        )
        return 0
    if args.target_params is not None:
        shape = shape_for_target(model, parse_param_count(args.target_params))
        shape.drop_layers = args.drop_layers
    else:
        shape = shape_from_ratios(model.config, args.mlp_ratio, args.hidden_ratio, args.heads, args.drop_layers)
    importance = estimate_importance(model, calibration.samples, device)
    small = apply_structured(model, importance, shape)
    before, after = count_parameters(model), count_parameters(small)
    report = {"shape": shape.to_dict(), "parameters": {"before": before, "after": after},
              "importance": importance.to_dict(), "calibration": calibration.describe()}  # fmt: skip
    save_folder(small, out, tokenizer, report)
    print(
        f"wrote {out}: {before:,} -> {after:,} parameters ({after / before:.1%}) in {time.perf_counter() - start:.1f}s"
    )
    return 0


def run_convert_gqa(args: argparse.Namespace) -> int:
    out = check_output(args.out)
    model, tokenizer = load_causal_lm(args.model)
    old = model.config.num_key_value_heads
    converted = convert_gqa(model, args.kv_heads)
    save_folder(converted, out, tokenizer, {"kv_heads": {"before": old, "after": args.kv_heads}})
    print(json.dumps({"out": str(out), "kv_heads_before": old, "kv_heads_after": args.kv_heads}))
    return 0
