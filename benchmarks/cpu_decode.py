"""Batch-1 decode speed on the CPU: the embedded default model in fp32, bf16, INT8 and INT4 weights through
slimserve, beside transformers (fp32 and bf16, eager, KV cache on; it has no CPU INT8/INT4 kernels of its own).

Decode rate = (N - 1) / (time to N tokens - time to the first token), each the best of --repeats runs, so the
prompt's prefill is left out. Both run with the same thread count (slimserve's default: the usable cores).
The machine's load average is recorded before and after: other processes sharing the cores slow every row.

usage: python benchmarks/cpu_decode.py            (one line to rerun; writes benchmarks/results/cpu-decode-<date>.json)
       python benchmarks/cpu_decode.py --model smollm2-135m --new-tokens 64 --repeats 3
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

from slimserve import LLM, SamplingParams
from slimserve.checkpoint.resolve import resolve_model
from slimserve.layers.cpu_quant import cpu_threads

PROMPT = "Write a short story about a lighthouse keeper who finds a message in a bottle."
ROWS = [("fp32", "float32", None), ("bf16", "bfloat16", None), ("INT8", "float32", "int8"), ("INT4", "float32", "int4")]


def best_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def decode_rate(generate, n: int, repeats: int) -> tuple[float, float]:
    """(decode tokens/s, seconds to the first token)."""
    generate(n)  # warm up
    first = best_time(lambda: generate(1), repeats)
    full = best_time(lambda: generate(n), repeats)
    return (n - 1) / max(full - first, 1e-9), first


def slimserve_row(folder: str, dtype: str, quant: str | None, ids: list[int], n: int, repeats: int) -> dict:
    llm = LLM(folder, device="cpu", dtype=dtype, cpu_quantization=quant, num_kv_blocks=64, enable_prefix_caching=False)

    def generate(k: int) -> None:
        params = SamplingParams(max_tokens=k, temperature=0.0, ignore_eos=True)
        llm.generate([{"prompt_token_ids": ids}], params, use_tqdm=False)

    rate, first = decode_rate(generate, n, repeats)
    return {"tokens_per_s": rate, "first_token_s": first}


def transformers_row(folder: str, dtype: str, ids: list[int], n: int, repeats: int) -> dict:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=getattr(torch, dtype)).eval()
    prompt = torch.tensor([ids])

    @torch.inference_mode()
    def generate(k: int) -> None:
        model.generate(prompt, max_new_tokens=k, min_new_tokens=k, do_sample=False, pad_token_id=0)

    rate, first = decode_rate(generate, n, repeats)
    return {"tokens_per_s": rate, "first_token_s": first}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="default", help="model (default: the embedded default model)")
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default="benchmarks/results")
    a = p.parse_args()
    folder = resolve_model(a.model)
    threads = cpu_threads()
    torch.set_num_threads(threads)
    from transformers import AutoTokenizer

    ids = AutoTokenizer.from_pretrained(folder)(PROMPT)["input_ids"]
    load_before = os.getloadavg()
    rows = []
    for label, dtype, quant in ROWS:
        ours = slimserve_row(folder, dtype, quant, ids, a.new_tokens, a.repeats)
        theirs = transformers_row(folder, dtype, ids, a.new_tokens, a.repeats) if quant is None else None
        rows.append({"weights": label, "dtype": dtype, "slimserve": ours, "transformers": theirs})
    load_after = os.getloadavg()

    fp32 = rows[0]["slimserve"]["tokens_per_s"]
    print(f"decode, batch 1, {a.new_tokens} new tokens, {threads} threads, prompt {len(ids)} tokens")
    print("| weights | slimserve tok/s | transformers tok/s | slimserve / transformers | vs slimserve fp32 |")
    print("|---|---:|---:|---:|---:|")
    for r in rows:
        ours, theirs = r["slimserve"]["tokens_per_s"], r["transformers"]
        t = "n/a" if theirs is None else f"{theirs['tokens_per_s']:.1f}"
        ratio = "-" if theirs is None else f"{ours / theirs['tokens_per_s']:.2f}x"
        print(f"| {r['weights']} | {ours:.1f} | {t} | {ratio} | {ours / fp32:.2f}x |")
    print(f"load average before/after: {load_before[0]:.2f} / {load_after[0]:.2f} (other processes share the cores)")
    date = datetime.datetime.now(datetime.timezone.utc)
    os.makedirs(a.out, exist_ok=True)
    path = os.path.join(a.out, f"cpu-decode-{date:%Y-%m-%d}.json")
    with open(path, "w") as f:
        json.dump(
            {
                "device": f"cpu: {platform.processor() or platform.machine()}, {os.cpu_count()} cores",
                "command": " ".join([sys.executable, *sys.argv]),
                "date": date.isoformat(),
                "model": folder,
                "threads": threads,
                "prompt_tokens": len(ids),
                "new_tokens": a.new_tokens,
                "torch": torch.__version__,
                "load_average_before": load_before,
                "load_average_after": load_after,
                "rows": rows,
            },
            f,
            indent=2,
        )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
