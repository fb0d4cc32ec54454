"""Where a quantized KV cache loses quality on a real model, and what wins it back (CPU is enough).

Every variant rounds the keys (after RoPE) and the values as they are written to the cache, in fp32 otherwise,
as the engine's cache does; queries and the attention arithmetic are never rounded. Static scales are
calibrated like `slimserve compress --kv-cache`: max |k| and |v| over the calibration set (generic corpus,
samples x tokens), per KV head or per layer. The variants separate the grid's rounding from its range (dynamic
per-token scales cannot saturate), keys from values, and layer from layer (the KL divergence when only one
layer's cache is FP8), then try the remedies: other scale layouts, the most sensitive layers kept in 16 bits
(as vLLM's --kv-cache-dtype-skip-layers does), and keys rotated by a Hadamard matrix per head after RoPE
(queries rotated alike, so q.k is unchanged: QuaRot's and SpinQuant's online rotation), which spreads the few
large key channels over all of them.

usage: python benchmarks/kv_quality.py --model ~/.cache/real-models/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf \
           --name qwen2.5-coder-0.5b --max-windows 4
Writes benchmarks/results/kv-quality-NAME.{json,md}.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time

import torch
from torch import nn

from slimserve.compress.args import QuantArgs
from slimserve.compress.corpus import generic_samples
from slimserve.compress.hadamard import hadamard
from slimserve.compress.loading import load_causal_lm
from slimserve.compress.quant import kv, qdq
from slimserve.compress.quant.kv_sensitivity import (
    CacheVariant,
    Scales,
    Transform,
    most_sensitive,
    run_through,
    scales,
    sensitivity,
    static,
)
from slimserve.eval.metrics import compare, windows
from slimserve.eval.text import heldout_text

FP8_HEAD = QuantArgs(8, "float", True, "attn_head")
FP8_TENSOR = QuantArgs(8, "float", True, "tensor")
FP8_DYNAMIC = QuantArgs(8, "float", True, "token", dynamic=True)  # one scale per token and head
INT8_HEAD = QuantArgs(8, "int", True, "attn_head")


def observe(model: nn.Module, samples: list[torch.Tensor], rotation: torch.Tensor) -> list[list[kv.KVObserver]]:
    """Per layer: the observed ranges of the keys and values, and of the rotated keys."""
    observers = [[kv.KVObserver(), kv.KVObserver()] for _ in kv.attention_modules(model)]

    def record(i: int, k: torch.Tensor, v: torch.Tensor):
        observers[i][0].add(k, v)
        observers[i][1].add(k @ rotation, v)
        return k, v

    run_through(model, samples, record)
    return observers


def rotated_keys(per_layer: Scales, rotation: torch.Tensor) -> Transform:
    """Keys stored as Q(k H) and read back as Q(k H) H^T: the scores equal (q H).Q(k H)."""

    def fn(i, k, v):
        ks, vs = per_layer[i]
        k = qdq.fake_quantize_activation(k @ rotation, FP8_HEAD, ks) @ rotation.T
        return k, qdq.fake_quantize_activation(v, FP8_HEAD, vs)

    return fn


def skipping(inner: Transform, keep: set[int]) -> Transform:
    return lambda i, k, v: (k, v) if i in keep else inner(i, k, v)


def bf16(i: int, k: torch.Tensor, v: torch.Tensor):
    return k.to(torch.bfloat16).float(), v.to(torch.bfloat16).float()


def dynamic(i: int, k: torch.Tensor, v: torch.Tensor):
    return qdq.fake_quantize_activation(k, FP8_DYNAMIC), qdq.fake_quantize_activation(v, FP8_DYNAMIC)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="reference model: HF folder or .gguf")
    p.add_argument("--name", help="short model name for the output files")
    p.add_argument("--num-samples", type=int, default=16, help="calibration samples (generic corpus)")
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--context", type=int, default=2048)
    p.add_argument("--max-windows", type=int, default=4)
    p.add_argument("--sensitivity-tokens", type=int, default=1024, help="tokens of the per-layer KL window")
    p.add_argument("--skip", type=int, nargs="+", default=[1, 2, 3, 5, 8], help="most sensitive layers kept in bf16")
    p.add_argument(
        "--headroom",
        type=float,
        nargs="*",
        default=[4.0],
        help="per-head scales times these factors (E4M3 keeps its "
        "relative precision over a wide range, so a larger scale trades little precision for no saturation)",
    )
    p.add_argument("--only", nargs="+", help="evaluate only the variants whose names contain one of these strings")
    p.add_argument("--out", default="benchmarks/results")
    args = p.parse_args()
    torch.manual_seed(0)
    name = args.name or os.path.basename(args.model).split(".")[0]
    model, tokenizer = load_causal_lm(args.model, torch.float32)
    text, text_name = heldout_text()
    wins = windows(torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"]), args.context, args.max_windows)
    calibration = generic_samples(tokenizer, args.num_samples, args.seq_len)
    attns = kv.attention_modules(model)
    head_dim = attns[0].head_dim
    rotation = (hadamard(head_dim) / head_dim**0.5).float()

    start = time.perf_counter()
    observers = observe(model, calibration, rotation)
    per_head = [scales(o, FP8_HEAD) for o, _ in observers]
    per_tensor = [scales(o, FP8_TENSOR) for o, _ in observers]
    int8_head = [scales(o, INT8_HEAD) for o, _ in observers]
    rotated = [scales(r, FP8_HEAD) for _, r in observers]
    ones = [(torch.ones(1), torch.ones(1)) for _ in attns]
    fp8 = static(per_head, FP8_HEAD)
    kl = sensitivity(model, fp8, [wins[0][:, : args.sensitivity_tokens]])
    calibrate_s = time.perf_counter() - start

    kv_heads = attns[0].config.num_key_value_heads
    variants: dict[str, tuple[Transform, float]] = {  # name -> (transform, bytes per token of the cache)
        "bf16": (bf16, 2.0),
        "FP8, per-head static scales (slimserve default)": (fp8, 1.0),
        "FP8, per-tensor static scales (llm-compressor default)": (static(per_tensor, FP8_TENSOR), 1.0),
        "FP8, scale 1.0 (no calibration)": (static(ones, FP8_TENSOR), 1.0),
        "FP8, dynamic per-token scales (no saturation)": (dynamic, 1.0),
        "FP8 keys only, per-head": (static(per_head, FP8_HEAD, values=False), 1.5),
        "FP8 values only, per-head": (static(per_head, FP8_HEAD, keys=False), 1.5),
        "INT8, per-head static scales": (static(int8_head, INT8_HEAD), 1.0),
        "FP8, per-head, Hadamard-rotated keys": (rotated_keys(rotated, rotation), 1.0),
    }
    for h in args.headroom:
        roomy = [(k * h, v * h) for k, v in per_head]
        variants[f"FP8, per-head static scales x{h:g}"] = (static(roomy, FP8_HEAD), 1.0)
    for n in args.skip:
        keep = most_sensitive(kl, n)
        variants[f"FP8, per-head, layers {keep} in bf16"] = (skipping(fp8, set(keep)), 1.0 + n / len(attns))
    if args.only:
        variants = {label: v for label, v in variants.items() if any(s in label for s in args.only)}
    models = {label: CacheVariant(model, fn) for label, (fn, _) in variants.items()}
    start = time.perf_counter()
    quality = compare(model, models, wins)
    evaluate_s = time.perf_counter() - start

    per_token = 2 * len(attns) * kv_heads * head_dim  # keys and values, bytes at one byte per element
    ref = quality["reference"]
    rows = {
        label: quality[label].to_dict()
        | {"kv_bytes_per_token": int(per_token * b), "rise": quality[label].perplexity / ref.perplexity - 1}
        for label, (_, b) in variants.items()
    }
    result = {
        "model": args.model,
        "command": " ".join([sys.executable, *sys.argv]),
        "device": "cpu",
        "host": platform.node(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
        "text": text_name,
        "windows": len(wins),
        "context": args.context,
        "calibration": {"source": "generic", "num_samples": args.num_samples, "seq_len": args.seq_len},
        "seconds": {"calibration_and_sensitivity": calibrate_s, "evaluation": evaluate_s},
        "reference": ref.to_dict(),
        "key_absmax_per_head": [o.k.tolist() for o, _ in observers],
        "value_absmax_per_head": [o.v.tolist() for o, _ in observers],
        "layer_kl_fp8_per_head": {"tokens": int(wins[0][:, : args.sensitivity_tokens].numel()), "kl": kl},
        "variants": rows,
    }
    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, f"kv-quality-{name}")
    with open(stem + ".json", "w") as f:
        json.dump(result, f, indent=2)
    table = markdown(name, result)
    with open(stem + ".md", "w") as f:
        f.write(table)
    print(table)


def markdown(name: str, result: dict) -> str:
    ref = result["reference"]
    lines = [
        f"# KV-cache quantization: {name}",
        "",
        f"{result['text']}, {result['windows']} windows of {result['context']} tokens; the reference keeps the cache "
        f"in fp32 (perplexity {ref['perplexity']:.3f}).",
        "",
        "| cache | bytes/token | perplexity | vs reference | KL (nats/token) | top-1 agreement |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for label, r in result["variants"].items():
        lines.append(
            f"| {label} | {r['kv_bytes_per_token']} | {r['perplexity']:.3f} | {100 * r['rise']:+.2f}% "
            f"| {r['kl_divergence']:.4f} | {100 * r['top1_agreement']:.2f}% |"
        )
    sens = result["layer_kl_fp8_per_head"]
    lines += ["", f"KL divergence with only one layer's cache in FP8 (per-head scales), {sens['tokens']} tokens:", ""]
    lines.append("| layer | " + " | ".join(str(j) for j in range(len(sens["kl"]))) + " |")
    lines.append("|---|" + "---:|" * len(sens["kl"]))
    lines.append("| KL | " + " | ".join(f"{x:.4f}" for x in sens["kl"]) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
