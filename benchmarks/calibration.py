"""Time and peak GPU memory of GPTQ W4A16 (group 128) on an 8B-class shape with random weights.

The model lives on the CPU; one decoder layer at a time moves to the GPU with the calibration activations
(the sequential pipeline of slimserve.compress). Random weights prove time and memory, never quality.
Writes benchmarks/results/calibration-<shape>.json with the device, the command and the time per layer.

usage: python benchmarks/calibration.py [--shape llama-3-8b] [--layers 32] [--num-samples 128] [--seq-len 2048]
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
from transformers import AutoConfig, AutoModelForCausalLM

from slimserve.compress import Calibration, Int4WeightOnly, quantize_

SHAPES = {
    "llama-3-8b": dict(
        model_type="llama", vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=8, head_dim=128, rms_norm_eps=1e-5, rope_theta=500000.0,
        max_position_embeddings=8192, tie_word_embeddings=False,
    ),
    "tiny": dict(
        model_type="llama", vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=64, max_position_embeddings=512,
    ),
}  # fmt: skip


def random_model(shape: str, layers: int | None, dtype: torch.dtype) -> torch.nn.Module:
    """Random weights without running the initializers (seconds instead of minutes for 8B)."""
    fields = dict(SHAPES[shape])
    if layers is not None:
        fields["num_hidden_layers"] = layers
    model_type = fields.pop("model_type")
    config = AutoConfig.for_model(model_type, **fields)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.to_empty(device="cpu")
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.fill_(1.0)
            else:
                p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float32).mul_(0.02).to(dtype))
        # Non-persistent buffers (the rotary frequencies) were left uninitialized by to_empty.
        rotary = model.model.rotary_emb
        model.model.rotary_emb = type(rotary)(config=config)
    return model.eval()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="llama-3-8b", choices=sorted(SHAPES))
    p.add_argument("--layers", type=int, help="decoder layers to build (default: the shape's)")
    p.add_argument("--num-samples", type=int, default=128)
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--out", default="benchmarks/results")
    args = p.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32

    start = time.perf_counter()
    model = random_model(args.shape, args.layers, dtype)
    build_s = time.perf_counter() - start
    gen = torch.Generator().manual_seed(1)
    vocab = model.config.vocab_size
    samples = [torch.randint(0, vocab, (1, args.seq_len), generator=gen) for _ in range(args.num_samples)]

    # The goal: peak memory under 1.5x (one decoder layer + the calibration activations entering and leaving it).
    layer_mb = sum(t.numel() * t.element_size() for t in model.model.layers[0].parameters()) / 2**20
    activations_mb = 2 * args.num_samples * args.seq_len * model.config.hidden_size * dtype.itemsize / 2**20
    budget_mb = 1.5 * (layer_mb + activations_mb)
    config = Int4WeightOnly(group_size=128, method="gptq")
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    report = quantize_(model, config, Calibration(samples, "random tokens"), device=device)
    if device.type == "cuda":
        torch.cuda.synchronize()
    total_s = time.perf_counter() - start

    per_layer = [{"layer": r.index, "seconds": r.seconds, "peak_memory_mb": r.peak_memory_mb} for r in report.layers]
    layer_s = [r.seconds for r in report.layers if r.index >= 0]
    result = {
        "benchmark": "GPTQ W4A16 g128, sequential layer-by-layer calibration",
        "shape": args.shape,
        "layers": len(layer_s),
        "calibration": {"num_samples": args.num_samples, "seq_len": args.seq_len},
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "dtype": str(dtype),
        "command": " ".join([sys.executable, *sys.argv]),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
        "model_build_seconds": build_s,
        "total_seconds": total_s,
        "mean_layer_seconds": sum(layer_s) / len(layer_s),
        "peak_memory_mb": report.peak_memory_mb,
        "decoder_layer_mb": layer_mb,
        "activations_mb": activations_mb,
        "peak_budget_mb": budget_mb,
        "peak_within_budget": report.peak_memory_mb <= budget_mb,
        "per_layer": per_layer,
    }
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"calibration-{args.shape}.json")
    with open(path, "w") as f:
        json.dump(result, f, indent=2)
    print("| shape | layers | samples x len | total (s) | per layer (s) | peak memory (MB) | budget (MB) | device |")
    print("|---|---:|---:|---:|---:|---:|---:|---|")
    print(
        f"| {args.shape} | {len(layer_s)} | {args.num_samples} x {args.seq_len} | {total_s:.1f} | "
        f"{result['mean_layer_seconds']:.2f} | {report.peak_memory_mb:.0f} | {budget_mb:.0f} | {result['device']} |"
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
