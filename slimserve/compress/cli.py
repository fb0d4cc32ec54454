"""`slimserve compress` and `slimserve eval`: argparse subcommands whose handlers take the parsed args."""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch

from slimserve.compress.api import Calibration, quantize_
from slimserve.compress.configs import KV_CACHE_PRESETS, METHODS, PRESETS, QuantConfig, kv_cache_preset, preset
from slimserve.compress.corpus import generic_samples, token_windows
from slimserve.compress.errors import CalibrationError, QuantConfigError
from slimserve.compress.loading import load_causal_lm
from slimserve.compress.recipe import CalibrationSpec, Recipe, load_recipe
from slimserve.compress.rotation import RotationConfig
from slimserve.compress.scale_tuning import tune_after_rounding
from slimserve.compress.selfgen import self_samples
from slimserve.compress.writer import check_output, save_compressed
from slimserve.config import parse_dtype
from slimserve.errors import SlimserveError


def add_compress_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser("compress", help="quantize a model and write a compressed-tensors checkpoint")
    p.add_argument("model", help="Hugging Face model folder or .gguf file")
    p.add_argument("--out", required=True, help="output folder (must not exist)")
    p.add_argument("--recipe", help="YAML recipe (scheme, stages, calibration)")
    p.add_argument("--scheme", help=f"preset: {', '.join(PRESETS)}")
    p.add_argument("--method", choices=METHODS, help="weight algorithm (default rtn)")
    p.add_argument("--group-size", help="32, 64, 128, or 'channel' for one scale per output channel")
    p.add_argument(
        "--kv-cache",
        choices=list(KV_CACHE_PRESETS),
        help="also quantize the KV cache, static scales calibrated per KV head (-tensor: one per layer)",
    )
    p.add_argument(
        "--kv-cache-skip-layers",
        metavar="LAYERS",
        help="with --kv-cache: decoder layers whose cache the engine keeps in full precision, e.g. 0,1,4 or 0-4,7, "
        "or auto:N for the N layers whose quantized cache alone costs the most KL divergence on calibration data",
    )
    p.add_argument(
        "--rotate",
        nargs="?",
        const="hadamard",
        choices=["hadamard", "orthogonal"],
        help="fold random rotations into the weights first (default kind: hadamard)",
    )
    p.add_argument("--observer", choices=["minmax", "mse"], help="weight range: own min/max or searched clipping")
    p.add_argument("--ignore", nargs="+", help="module names or re:patterns to keep in full precision")
    p.add_argument(
        "--moe-calibrate-all-experts",
        action="store_true",
        help="MoE: run every expert on every calibration token for its statistics (default: routed tokens only)",
    )
    p.add_argument(
        "--tune-scales-steps",
        type=int,
        default=0,
        help="after rounding, distil the quantization scales on the original model's logits for this many steps "
        "over the calibration text (codes stay; 2-bit and ternary gain most; the original stays in memory)",
    )
    p.add_argument("--tune-scales-minutes", type=float, help="stop scale tuning after this many minutes")
    p.add_argument("--calib", help="calibration text: generic (shipped corpus), self (model-written) or a file")
    p.add_argument("--num-samples", type=int, help="calibration sequences (default 128)")
    p.add_argument("--seq-len", type=int, help="tokens per calibration sequence (default 512)")
    p.add_argument("--device", help="calibration device (default: cuda when available)")
    p.add_argument("--dtype", default="auto", help="weights dtype while compressing (auto: bf16 on CUDA, fp32 on CPU)")
    p.set_defaults(func=run_compress)
    return p


def add_eval_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser("eval", help="perplexity, KL divergence and top-1 agreement against a reference")
    p.add_argument("models", nargs="+", help="compressed model folders (or any model paths) to evaluate")
    p.add_argument("--reference", required=True, help="the uncompressed model (folder or .gguf)")
    p.add_argument("--text", help="held-out text file (default: the shipped Austen held-out text)")
    p.add_argument("--context", type=int, default=2048, help="tokens per non-overlapping window")
    p.add_argument("--max-windows", type=int, help="evaluate only the first N windows")
    p.add_argument("--plot", help="write a size-versus-perplexity PNG here")
    p.add_argument("--json", help="write the numbers as JSON here")
    p.add_argument("--device", help="evaluation device (default: cuda when available)")
    p.set_defaults(func=run_eval)
    return p


def _group_size(value: str | None) -> dict:
    if value is None:
        return {}
    if value == "channel":
        return {"group_size": None}
    try:
        return {"group_size": int(value)}
    except ValueError:
        raise QuantConfigError(f"--group-size must be 32, 64, 128 or 'channel', not {value!r}") from None


def build_recipe(args: argparse.Namespace) -> Recipe:
    """The recipe file, or a preset with the command-line options; command-line calibration flags win."""
    if bool(args.recipe) == bool(args.scheme):
        raise QuantConfigError("give exactly one of --recipe and --scheme")
    if args.recipe:
        flags = (args.method, args.group_size, args.kv_cache, args.kv_cache_skip_layers, args.ignore)
        if any(flags) or args.moe_calibrate_all_experts or args.rotate or args.observer:
            raise QuantConfigError(
                "--method, --group-size, --kv-cache, --kv-cache-skip-layers, --ignore, --moe-calibrate-all-experts, "
                "--rotate and --observer go into the recipe file"
            )
        recipe = load_recipe(args.recipe)
    else:
        overrides = _group_size(args.group_size)
        if args.method:
            overrides["method"] = args.method
        if args.kv_cache_skip_layers and not args.kv_cache:
            raise QuantConfigError("--kv-cache-skip-layers needs --kv-cache (fp8 or int8)")
        if args.kv_cache:
            overrides["kv_cache"] = kv_cache_preset(args.kv_cache, args.kv_cache_skip_layers)
        if args.ignore:
            overrides["ignore"] = tuple(args.ignore)
        if args.moe_calibrate_all_experts:
            overrides["moe_calibrate_all_experts"] = True
        if args.rotate:
            overrides["rotation"] = RotationConfig(kind=args.rotate)
        if args.observer:
            overrides["observer"] = args.observer
        recipe = Recipe(preset(args.scheme, **overrides))
    spec = recipe.calibration
    for field, value in (("source", args.calib), ("num_samples", args.num_samples), ("seq_len", args.seq_len)):
        if value is not None:
            setattr(spec, field, value)
    return recipe


def calibration_samples(spec: CalibrationSpec, model, tokenizer, device: torch.device) -> Calibration:
    if tokenizer is None:
        raise CalibrationError("the model has no tokenizer to turn calibration text into tokens")
    if spec.source == "generic":
        return Calibration(generic_samples(tokenizer, spec.num_samples, spec.seq_len, spec.seed), "generic")
    if spec.source == "self":
        home = next(model.parameters()).device
        model.to(device)
        try:
            samples = self_samples(model, tokenizer, spec.num_samples, spec.seq_len, seed=spec.seed)
        finally:
            model.to(home)
        return Calibration(samples, "self")
    path = Path(spec.source)
    if not path.is_file():
        raise CalibrationError(f"--calib {spec.source}: expected generic, self, or an existing text file")
    text = path.read_text(encoding="utf-8", errors="replace")
    return Calibration(token_windows([text], tokenizer, spec.num_samples, spec.seq_len, spec.seed), str(path))


def run_compress(args: argparse.Namespace) -> int:
    out = check_output(args.out)
    if args.tune_scales_steps < 0 or (args.tune_scales_minutes is not None and args.tune_scales_minutes <= 0):
        raise QuantConfigError("--tune-scales-steps and --tune-scales-minutes must be positive")
    recipe = build_recipe(args)
    config: QuantConfig = recipe.config
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model, tokenizer = load_causal_lm(args.model, parse_dtype(args.dtype, device))
    calibration = None
    if config.needs_calibration or args.tune_scales_steps:
        calibration = calibration_samples(recipe.calibration, model, tokenizer, device)
    teacher = copy.deepcopy(model) if args.tune_scales_steps else None
    start = time.perf_counter()
    report = quantize_(model, config, calibration if config.needs_calibration else None, device=device)
    if teacher is not None:
        tune_after_rounding(teacher, model, calibration.samples, args.tune_scales_steps, report,
                            args.tune_scales_minutes, device)  # fmt: skip
        del teacher
    save_compressed(model, config, out, tokenizer, report)
    source = report.calibration["source"] if report.calibration else "none"
    print(f"wrote {out} ({config.format}, calibration: {source}) in {time.perf_counter() - start:.1f}s")
    return 0


def run_eval(args: argparse.Namespace) -> int:
    from slimserve.eval.metrics import compare, windows
    from slimserve.eval.size import model_bytes
    from slimserve.eval.table import Row, markdown, plot
    from slimserve.eval.text import heldout_text

    text, text_name = heldout_text(args.text)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    reference, tokenizer = load_causal_lm(args.reference)
    if tokenizer is None:
        raise SlimserveError(f"{args.reference}: the reference has no tokenizer")
    ids = torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"])
    wins = windows(ids, args.context, args.max_windows)
    models, sizes = {}, {"reference": model_bytes(args.reference, reference)}
    for path in args.models:
        models[path], _ = load_causal_lm(path)
        sizes[path] = model_bytes(path, models[path])
    for m in (reference, *models.values()):
        m.to(device)
    quality = compare(reference, models, wins)
    rows = [Row(name, sizes[name], q) for name, q in quality.items()]
    print(markdown(rows, text_name), end="")
    if args.plot:
        plot(rows, args.plot, f"{text_name}, {len(wins)} x {args.context} tokens")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({r.name: {"size_bytes": r.size_bytes, **r.quality.to_dict()} for r in rows}, f, indent=2)
    return 0


def main(argv: list[str] | None = None) -> int:
    """Standalone entry (python -m slimserve.compress.cli): one line and exit code 2 on bad input."""
    parser = argparse.ArgumentParser(prog="slimserve")
    sub = parser.add_subparsers(dest="command", required=True)
    add_compress_parser(sub)
    add_eval_parser(sub)
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except SlimserveError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
