"""Quality of every compression scheme against the uncompressed model, on a real model (CPU is enough).

Each variant is quantized in memory (the fake-quantized model computes exactly what its compressed-tensors
checkpoint computes in `transformers`; tests/compress/test_roundtrip.py checks that), then evaluated on the
Austen held-out text (Persuasion) against the reference: perplexity over non-overlapping windows, KL divergence
and top-1 agreement. Writes JSON, a markdown table and a size-versus-perplexity PNG under benchmarks/results/.

usage: python benchmarks/quality.py --model ~/.cache/real-models/SmolLM2-135M-Instruct.Q4_1.gguf \
           --group-size 64 --variants W8A16:rtn W4A16:rtn W4A16:gptq:generic W4A16:gptq:self ...
A variant is SCHEME:METHOD[:CALIBRATION][+rot][+mse][+clip][+head][+tune]
[+kv-fp8|+kv-int8|+kv-fp8-tensor|+kv-int8-tensor[-skipS]]; calibration is generic or self (default generic when
the variant needs data); +rot folds randomized Hadamard rotations into the weights first and +mse searches each
group's clipping range (the "mse" observer) instead of taking its min/max; +clip turns on AWQ's clipping search
(off by default); +head quantizes the output head too (lm_head, kept in full precision by default); +tune
distils the scales on the reference's logits after rounding (--tune-steps steps over the calibration text);
+kv-* adds a static KV-cache scheme, scales per KV head (or per tensor), calibrated on the same data, with -skipS
keeping layers in full precision: S is a count N (the N layers whose rounded cache alone costs the most KL, as
`slimserve compress --kv-cache-skip-layers auto:N` chooses them) or a list of indices ("0,1,4").
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime
import gc
import json
import os
import platform
import sys
import time

import torch

from slimserve.compress import Calibration, preset, quantize_
from slimserve.compress.configs import DEFAULT_IGNORE, kv_cache_preset
from slimserve.compress.corpus import generic_samples
from slimserve.compress.errors import QuantConfigError
from slimserve.compress.loading import load_causal_lm
from slimserve.compress.modules import dequantized_once
from slimserve.compress.rotation import RotationConfig
from slimserve.compress.scale_tuning import tune_after_rounding
from slimserve.compress.selfgen import self_samples
from slimserve.compress.structure import decoder_layers
from slimserve.eval.metrics import compare, windows
from slimserve.eval.size import module_bytes
from slimserve.eval.table import Row, markdown, plot
from slimserve.eval.text import heldout_text

DEFAULT_VARIANTS = [
    "W8A16:rtn",
    "W8A8:rtn:generic",
    "W8A8:gptq:generic",
    "FP8:rtn",
    "FP8_BLOCK:rtn",
    "FP8_STATIC:rtn:generic",
    "W4A16:rtn",
    "W4A16_ASYM:rtn",
    "W4A16:gptq:generic",
    "W4A16:gptq:self",
    "W4A16:awq:generic",
    "W4A16:awq:self",
    "W4A8:gptq:generic",
    "FP8:rtn:generic+kv-fp8",
    "FP8:rtn:generic+kv-int8",
]
REFERENCE_NOTE = (
    "The reference is the dequantized 4-bit GGUF model: its fp32 weights already lie on a 4-bit grid "
    "(another grid and group layout). INT8/FP8 deltas are honest against it; INT4 results start from weights "
    "that were already 4-bit, so they look better than they would on a true 16-bit model."
)


def parse_variant(text: str, group_size: int | None):
    """(config, calibration source or None, whether to tune the scales after rounding)."""
    spec, *extras = text.split("+")
    parts = spec.split(":")
    scheme, method = parts[0], parts[1] if len(parts) > 1 else "rtn"
    calib = parts[2] if len(parts) > 2 else None
    overrides: dict = {"method": method}
    tune = "tune" in extras
    if scheme.upper().startswith(("W4", "W8A16")):
        overrides["group_size"] = group_size
    for extra in extras:
        if extra == "rot":
            overrides["rotation"] = RotationConfig()
        elif extra == "mse":
            overrides["observer"] = "mse"
        elif extra == "head":
            overrides["ignore"] = tuple(name for name in DEFAULT_IGNORE if name != "lm_head")
        elif extra in ("tune", "clip"):
            continue
        else:
            kind, _, skip = extra.removeprefix("kv-").partition("-skip")
            skip = f"auto:{skip}" if skip.isdigit() else skip
            overrides["kv_cache"] = kv_cache_preset(kind, skip or None)
    config = preset(scheme, **overrides)
    if "clip" in extras:
        if config.method != "awq":
            raise QuantConfigError(f"{text}: +clip is AWQ's clipping search; the method is {config.method}")
        config.awq.clip = True
    if (config.needs_calibration or tune) and calib is None:
        calib = "generic"
    return config, calib, tune


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="reference model: HF folder or .gguf")
    p.add_argument("--name", help="short model name for the output files")
    p.add_argument("--variants", nargs="+", default=DEFAULT_VARIANTS)
    p.add_argument("--group-size", type=int, default=128, help="group size of the INT4/W8A16 variants")
    p.add_argument("--num-samples", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--context", type=int, default=2048)
    p.add_argument("--max-windows", type=int, default=8)
    p.add_argument("--chunk", type=int, default=4, help="variants evaluated side by side per reference pass")
    p.add_argument(
        "--extra-text",
        nargs="*",
        default=[],
        help="more held-out texts (files used by no calibration), each evaluated like Persuasion",
    )
    p.add_argument(
        "--awq-tokens", type=int, help="calibration tokens AWQ scores its scale search on (default: AWQOptions')"
    )
    p.add_argument(
        "--awq-objective", choices=["layer", "linear"], help="what AWQ scores its scales on (default: AWQOptions')"
    )
    p.add_argument("--tune-steps", type=int, default=200, help="scale-tuning steps of the +tune variants")
    p.add_argument(
        "--off-grid",
        type=float,
        default=0.0,
        help="move the reference's decoder weights off their 4-bit grid: add Gaussian noise of this fraction of each "
        "32-weight block's step ((max - min) / 15) before anything else, and use that model as the reference",
    )
    p.add_argument("--out", default="benchmarks/results")
    args = p.parse_args()
    torch.manual_seed(0)
    name = args.name or os.path.basename(args.model).split(".")[0]
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")

    reference, tokenizer = load_causal_lm(args.model, torch.float32)
    if args.off_grid:
        perturb_off_grid(reference, args.off_grid)
    texts = {}  # name -> evaluation windows; the first (Persuasion) is the main table
    for path in [None, *args.extra_text]:
        text, text_name = heldout_text(path)
        ids = torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"])
        texts[text_name] = windows(ids, args.context, args.max_windows)
    text_name, wins = next(iter(texts.items()))
    try:
        variants = [(v, *parse_variant(v, args.group_size)) for v in args.variants]
    except QuantConfigError as e:
        p.error(str(e))
    for _, config, _, _ in variants:
        if args.awq_tokens:
            config.awq.max_tokens = args.awq_tokens
        if args.awq_objective:
            config.awq.objective = args.awq_objective

    calibration: dict[str, Calibration] = {}
    timings: dict[str, float] = {}
    for source in sorted({c for _, _, c, _ in variants if c}):
        start = time.perf_counter()
        if source == "generic":
            data = generic_samples(tokenizer, args.num_samples, args.seq_len)
        else:
            data = self_samples(reference.to(device), tokenizer, args.num_samples, args.seq_len)
            reference.to("cpu")
        calibration[source] = Calibration(data, source)
        timings[f"calibration_{source}_s"] = time.perf_counter() - start

    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, f"quality-{name}")
    header = {
        "model": args.model,
        "command": " ".join([sys.executable, *sys.argv]),
        "device": str(device) if device.type == "cpu" else torch.cuda.get_device_name(device),
        "host": platform.node(),
        "text": text_name,
        "windows": len(wins),
        "extra_texts": {text: {"windows": len(w)} for text, w in list(texts.items())[1:]},
        "context": args.context,
        "calibration": {"num_samples": args.num_samples, "seq_len": args.seq_len, **timings},
        "note": REFERENCE_NOTE,
    }
    rows: dict[str, list[Row]] = {text: [] for text in texts}
    results: dict[str, dict] = {}
    for first in range(0, len(variants), args.chunk):
        models = {}
        for label, config, calib, tune in variants[first : first + args.chunk]:
            model = copy.deepcopy(reference)
            start = time.perf_counter()
            report = quantize_(model, config, calibration.get(calib), device=device, progress=False)
            if tune:
                samples = calibration[calib].samples
                tune_after_rounding(reference, model, samples, args.tune_steps, report, device=device)
            results[label] = {
                "scheme": config.describe(),
                "calibration": calib or "none",
                "quantize_seconds": time.perf_counter() - start,
                "size_bytes": module_bytes(model),
                "gptq_fallbacks": report.gptq_fallbacks,
                "scale_tuning": report.scale_tuning,
            }
            models[label] = model.to(device)
        for text, text_wins in texts.items():
            with contextlib.ExitStack() as stack:
                for model in models.values():
                    stack.enter_context(dequantized_once(model))  # unpacked once, not at every window
                quality = compare(reference.to(device), models, text_wins)
            main_text = text == text_name
            if not rows[text]:
                rows[text].append(Row("reference (dequantized GGUF)", module_bytes(reference), quality["reference"]))
                ref = quality["reference"].to_dict() | {"size_bytes": rows[text][0].size_bytes}
                (header if main_text else header["extra_texts"][text])["reference"] = ref
            for label in models:
                if main_text:
                    results[label].update(quality[label].to_dict())
                else:
                    results[label].setdefault("extra_texts", {})[text] = quality[label].to_dict()
                r = results[label]
                rows[text].append(Row(label, r["size_bytes"], quality[label], r["calibration"]))
        del models
        gc.collect()
        # Written after every chunk, so a long run leaves its finished variants behind.
        table = write_outputs(stem, name, header, results, rows, args.context, texts)
    print(REFERENCE_NOTE)
    print(table)


@torch.no_grad()
def perturb_off_grid(model: torch.nn.Module, fraction: float, block: int = 32, seed: int = 0) -> None:
    """Add N(0, (fraction * step)^2) to every decoder linear weight, step being its 32-weight block's
    (max - min) / 15: the GGUF 4-bit step (sub-blocks of 32), so that no weight stays on that grid."""
    gen = torch.Generator().manual_seed(seed)
    for lin in decoder_layers(model).modules():
        if not isinstance(lin, torch.nn.Linear) or lin.in_features % block:
            continue
        w = lin.weight.view(lin.out_features, -1, block)
        step = (w.amax(-1, keepdim=True) - w.amin(-1, keepdim=True)) / 15
        w.add_(torch.randn(w.shape, generator=gen) * step * fraction)


def write_outputs(
    stem: str, model_name: str, header: dict, results: dict, rows: dict[str, list[Row]], context: int, texts: dict
) -> str:
    tables = [markdown(rows[name], f"{name}, {len(wins)} windows of {context} tokens") for name, wins in texts.items()]
    table = "\n".join(tables)
    with open(stem + ".md", "w") as f:
        f.write(f"# Quality of compression schemes: {model_name}\n\n{REFERENCE_NOTE}\n\n{table}")
    main_text, wins = next(iter(texts.items()))
    plot(rows[main_text], stem + ".png", f"{model_name}: {main_text}, {len(wins)} x {context} tokens")
    date = datetime.datetime.now(datetime.timezone.utc).isoformat()
    with open(stem + ".json", "w") as f:
        json.dump({**header, "date": date, "variants": results}, f, indent=2)
    return table


if __name__ == "__main__":
    main()
