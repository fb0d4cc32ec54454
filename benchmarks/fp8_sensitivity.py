"""Where FP8 W8A8 loses quality on a real model: weights against activations, each projection type, each layer.

FP8 here is the "FP8" preset (per-channel E4M3 weights, dynamic per-token E4M3 activations). Every row applies
it to a subset of the decoder's linear layers (the others stay in float32) and reports the perplexity rise on
the Austen held-out text; the activation statistics say why a layer is sensitive: the ratio of each token's
largest input to its median magnitude, and the share of inputs that FP8's per-token scale flushes to zero or
to subnormals (below 2^-6 after scaling, 3 significant bits or fewer).

usage: python benchmarks/fp8_sensitivity.py --model ~/.cache/real-models/SmolLM2-135M-Instruct.Q4_1.gguf
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import sys
from collections import defaultdict

import torch
from torch import nn

from slimserve.compress.configs import DEFAULT_IGNORE, preset
from slimserve.compress.loading import load_causal_lm
from slimserve.compress.quant import qdq
from slimserve.compress.structure import decoder_layers, target_linears
from slimserve.eval.metrics import compare, windows
from slimserve.eval.text import heldout_text

SUBNORMAL = 2.0**-6  # smallest normal E4M3 magnitude
LAYER_INDEX = re.compile(r"\.(\d+)\.")


class FakeFP8(nn.Module):
    """A linear layer with FP8 weights and/or FP8 dynamic per-token inputs (the FP8 preset's arithmetic)."""

    def __init__(self, lin: nn.Linear, weights: bool, inputs: bool) -> None:
        super().__init__()
        config = preset("FP8")
        self.wargs, self.iargs = config.weight_args(), config.input_args()
        w = lin.weight.detach()
        self.weight = nn.Parameter(qdq.fake_quantize_weight(w, self.wargs) if weights else w.clone(), False)
        self.bias = lin.bias
        self.inputs = inputs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.inputs:
            x = qdq.fake_quantize_activation(x, self.iargs)
        return nn.functional.linear(x, self.weight, self.bias)


def linears(model: nn.Module) -> dict[str, nn.Linear]:
    layers = decoder_layers(model)
    prefix = next(name for name, m in model.named_modules() if m is layers)
    return target_linears(layers, prefix, DEFAULT_IGNORE)


def fp8_copy(model: nn.Module, names: set[str], weights: bool = True, inputs: bool = True) -> nn.Module:
    """A model sharing the reference's untouched layers, with FakeFP8 in place of the named linears."""
    import copy

    out = copy.deepcopy(model)
    for name, lin in linears(out).items():
        if name in names:
            parent, _, child = name.rpartition(".")
            setattr(out.get_submodule(parent), child, FakeFP8(lin, weights, inputs))
    return out


@torch.no_grad()
def activation_stats(model: nn.Module, wins: list[torch.Tensor]) -> dict[str, dict[str, float]]:
    """Per linear: the mean over tokens of max|x| / median|x|, its maximum, and the shares of inputs that
    per-token FP8 scaling sends to zero or below the smallest normal number."""
    iargs = preset("FP8").input_args()
    acc: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))

    def hook(name: str):
        def fn(mod, inputs, out):
            x = inputs[0].reshape(-1, inputs[0].shape[-1]).float()
            a = x.abs()
            ratio = a.amax(-1) / a.median(-1).values.clamp(min=1e-12)
            scaled = (x / qdq.dynamic_scale(x, iargs)).abs()
            nonzero = a > 0
            s = acc[name]
            s["tokens"] += x.shape[0]
            s["ratio_sum"] += ratio.sum().item()
            s["ratio_max"] = max(s["ratio_max"], ratio.max().item())
            s["values"] += nonzero.sum().item()
            q = qdq.fake_quantize_activation(x, iargs)
            s["flushed"] += ((q == 0) & nonzero).sum().item()
            s["subnormal"] += ((scaled < SUBNORMAL) & nonzero).sum().item()

        return fn

    handles = [lin.register_forward_hook(hook(n)) for n, lin in linears(model).items()]
    try:
        for w in wins:
            model(input_ids=w, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return {
        n: {
            "max_over_median_mean": s["ratio_sum"] / s["tokens"],
            "max_over_median_max": s["ratio_max"],
            "flushed_to_zero": s["flushed"] / max(s["values"], 1),
            "subnormal": s["subnormal"] / max(s["values"], 1),
        }
        for n, s in acc.items()
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True)
    p.add_argument("--name")
    p.add_argument("--context", type=int, default=2048)
    p.add_argument("--max-windows", type=int, default=2)
    p.add_argument("--out", default="benchmarks/results")
    args = p.parse_args()
    name = args.name or os.path.basename(args.model).split(".")[0]
    model, tokenizer = load_causal_lm(args.model, torch.float32)
    text, text_name = heldout_text()
    wins = windows(torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"]), args.context, args.max_windows)
    names = set(linears(model))
    kinds = sorted({n.rsplit(".", 1)[-1] for n in names})
    layer_of = {n: int(LAYER_INDEX.search(n).group(1)) for n in names}
    subsets: dict[str, tuple[set[str], bool, bool]] = {
        "all (FP8 W8A8)": (names, True, True),
        "weights only": (names, True, False),
        "activations only": (names, False, True),
    }
    for kind in kinds:
        subsets[f"only {kind}"] = ({n for n in names if n.endswith(kind)}, True, True)
        subsets[f"all but {kind}"] = ({n for n in names if not n.endswith(kind)}, True, True)
    for i in sorted(set(layer_of.values())):
        subsets[f"only layer {i}"] = ({n for n in names if layer_of[n] == i}, True, True)

    rows = {}
    ref_ppl = None
    for label, (subset, weights, inputs) in subsets.items():
        q = compare(model, {label: fp8_copy(model, subset, weights, inputs)}, wins, progress=False)
        ref_ppl = q["reference"].perplexity
        rows[label] = q[label].to_dict() | {"rise": q[label].perplexity / ref_ppl - 1}
        print(f"{label:>28}: ppl {q[label].perplexity:.3f} ({100 * rows[label]['rise']:+.2f}%)", flush=True)
    stats = activation_stats(model, wins)
    by_kind = {
        kind: {
            key: max(stats[n][key] for n in names if n.endswith(kind))
            for key in ("max_over_median_max", "flushed_to_zero", "subnormal")
        }
        for kind in kinds
    }
    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, f"fp8-sensitivity-{name}")
    result = {
        "model": args.model,
        "command": " ".join([sys.executable, *sys.argv]),
        "device": "cpu",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
        "text": text_name,
        "windows": len(wins),
        "context": args.context,
        "reference_perplexity": ref_ppl,
        "rows": rows,
        "activation_stats": stats,
        "activation_stats_by_kind_max": by_kind,
    }
    with open(stem + ".json", "w") as f:
        json.dump(result, f, indent=2)
    lines = [
        f"# FP8 W8A8 sensitivity: {name}",
        "",
        f"Perplexity on {text_name}, {len(wins)} windows of {args.context} tokens; reference {ref_ppl:.3f}.",
        "",
        "| FP8 applied to | perplexity | rise | KL (nats/token) |",
        "|---|---:|---:|---:|",
    ]
    for label, r in rows.items():
        lines.append(f"| {label} | {r['perplexity']:.3f} | {100 * r['rise']:+.2f}% | {r['kl_divergence']:.4f} |")
    lines += [
        "",
        "Inputs of each projection type (worst layer): largest max/median ratio of one token, share of inputs that",
        "per-token FP8 flushes to zero, share below the smallest normal number after scaling.",
        "",
        "| projection | max/median | flushed to zero | subnormal |",
        "|---|---:|---:|---:|",
    ]
    for kind, s in by_kind.items():
        lines.append(
            f"| {kind} | {s['max_over_median_max']:.0f} | {100 * s['flushed_to_zero']:.3f}% | "
            f"{100 * s['subnormal']:.3f}% |"
        )
    with open(stem + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
