"""Paged decode attention over long contexts, bf16 against FP8 KV cache, on a GPU, one run:

  * checks: the decode kernel against the plain-torch reference at the Llama-3.1-8B head shape (32 query / 8 KV
    heads of 128, blocks of 16 tokens), bf16 and FP8 (per-KV-head scales) caches, every launch tried below;
  * sweep: decode launches (key tile, warps, pipelining depth, fp16 dot products for FP8, programs per SM and
    how the split count rounds) at batch 1 with 32K and 128K contexts and batch 8 with 32K; the tuned launch
    per cache dtype is the best geometric mean over those shapes;
  * timings: decode attention alone at contexts 4K/32K/128K for batch 1 and 8, each cache dtype with the
    baseline launch (DecodeConfig()), the committed table (DECODE_CONFIGS) and this run's tuned launch: us per
    call replayed from a CUDA graph with a cold L2, GB/s of the bytes read (KV of the context, queries, block
    tables, output) and the fraction of 3.0 TB/s;
  * engine: benchmarks/quant.py's KV-cache comparison (Llama-3.1-8B shape, bf16 weights, decode at a 32K
    context, bf16 vs FP8 cache) with each launch named by --engine-launches.
Writes benchmarks/results/decode-attention-<date>.json.

usage: python benchmarks/decode_attention.py [--parts checks sweep timings engine]
                                             [--engine-launches baseline table tuned]
       TRITON_INTERPRET=1 python benchmarks/decode_attention.py --device cpu --context-divisor 512
                                             --parts checks sweep timings   (tiny shapes, checks the script)
"""

from __future__ import annotations

import argparse
import datetime
import gc
import itertools
import json
import math
import os
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
import triton

from slimserve.kernels import attention
from slimserve.kernels.attention import DecodeConfig, paged_attention_triton
from slimserve.kernels.attention_ref import paged_attention_ref

HBM_BYTES_PER_S = 3.0e12
HEADS, KV_HEADS, HEAD_DIM, BLOCK_SIZE = 32, 8, 128, 16  # Llama-3.1-8B
KV_DTYPES = {"bf16": torch.bfloat16, "fp8": torch.float8_e4m3fn}
TUNING_SHAPES = [(1, 32768), (1, 131072), (8, 32768)]  # (batch, context)
TABLE_SHAPES = [(b, c) for c in (4096, 32768, 131072) for b in (1, 8)]
CHECK_SHAPES = [(1, 32768, 1), (8, 6000, 2)]  # (batch, longest context, seed)
PARTS = ["checks", "sweep", "timings", "engine"]
LAUNCHES = ["baseline", "table", "tuned"]


@dataclass(frozen=True)
class Bench:
    """Where the run goes: the device, and a divisor of every context (tiny shapes check the script on the CPU
    under Triton's interpreter)."""

    device: torch.device
    context_divisor: int = 1

    def shapes(self, shapes: list[tuple]) -> list[tuple]:
        return [(s[0], max(s[1] // self.context_divisor, 3), *s[2:]) for s in shapes]


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def paged_batch(bench: Bench, lens: list[int], kv: str, seed: int) -> dict:
    """bf16 queries and a randomly paged, randomly filled cache holding every sequence (FP8: values up to about
    +-80 before the per-head scales, as a calibrated cache spreads them over the FP8 range)."""
    dev = bench.device
    gen = torch.Generator(device=dev).manual_seed(seed)
    blocks = [-(-n // BLOCK_SIZE) for n in lens]
    order = torch.randperm(sum(blocks), device=dev, generator=gen, dtype=torch.int32)
    tables = torch.zeros((len(lens), max(blocks)), dtype=torch.int32, device=dev)
    used = 0
    for i, n in enumerate(blocks):
        tables[i, :n] = order[used : used + n]
        used += n
    shape = (sum(blocks), BLOCK_SIZE, KV_HEADS, HEAD_DIM)
    batch = dict(
        q=torch.randn(len(lens), HEADS, HEAD_DIM, device=dev, generator=gen).bfloat16(),
        cu_seqlens_q=torch.arange(len(lens) + 1, dtype=torch.int32, device=dev),
        seq_lens=torch.tensor(lens, dtype=torch.int32, device=dev),
        block_tables=tables,
        scale=HEAD_DIM**-0.5,
    )
    for name in ("k", "v"):
        values = torch.randn(shape, device=dev, generator=gen)
        if kv == "fp8":
            batch[f"{name}_cache"] = (values * 20).to(torch.float8_e4m3fn)
            batch[f"{name}_scale"] = torch.rand(KV_HEADS, device=dev, generator=gen) * 0.05 + 0.01
        else:
            batch[f"{name}_cache"] = values.bfloat16()
    return batch


def reference(batch: dict) -> torch.Tensor:
    return paged_attention_ref(**batch)


def bytes_read(batch: dict) -> int:
    kv = 2 * int(batch["seq_lens"].sum()) * KV_HEADS * HEAD_DIM * batch["k_cache"].element_size()
    return kv + 2 * batch["q"].nbytes + batch["block_tables"].nbytes


def run_fn(batch: dict, cfg: DecodeConfig) -> Callable[[], torch.Tensor]:
    return lambda: paged_attention_triton(**batch, max_seqlen_q=1, decode_config=cfg)


class ColdTimer:
    """us per call replayed from a CUDA graph with L2 flushed before each call (in a forward pass the other
    layers' weights and KV pass through L2 in between); the flushes' own time is measured once and taken off.
    On the CPU: the median wall time of three calls."""

    def __init__(self, device: torch.device, reps: int = 10) -> None:
        self.reps = reps
        self.cuda = device.type == "cuda"
        if self.cuda:
            l2 = torch.cuda.get_device_properties(device).L2_cache_size
            self.flush = torch.empty(2 * l2, dtype=torch.int8, device=device)
            self.flush_us = self._replay_us(lambda: None)

    def _replay_us(self, fn: Callable[[], object]) -> float:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for _ in range(self.reps):
                self.flush.zero_()
                fn()
        ms = triton.testing.do_bench(graph.replay, warmup=5, rep=40, return_mode="median")
        return ms * 1e3 / self.reps

    def __call__(self, fn: Callable[[], object]) -> float:
        fn()  # compile outside the capture
        if self.cuda:
            return self._replay_us(fn) - self.flush_us
        times = []
        for _ in range(3):
            start = time.perf_counter()
            fn()
            times.append((time.perf_counter() - start) * 1e6)
        return sorted(times)[1]


# ---- checks ---------------------------------------------------------------------------------------------
def check_lens(batch_size: int, context: int, seed: int) -> list[int]:
    """Odd lengths up to `context` (the first is `context` - 1), so tiles and splits end mid-block."""
    gen = torch.Generator().manual_seed(seed)
    rest = (torch.randint(1, max(context // 2, 2), (batch_size - 1,), generator=gen) * 2 + 1).tolist()
    return [context - 1, *rest]


class Checker:
    """Reference outputs of a few batches per cache dtype, computed once; each launch is checked on all of them
    (output poisoned with NaN first, so an unwritten element fails)."""

    def __init__(self, bench: Bench) -> None:
        shapes = bench.shapes(CHECK_SHAPES)
        self.batches = {kv: [paged_batch(bench, check_lens(b, c, s), kv, s) for b, c, s in shapes] for kv in KV_DTYPES}
        self.refs = {kv: [reference(b) for b in bs] for kv, bs in self.batches.items()}

    def __call__(self, kv: str, cfg: DecodeConfig) -> float:
        worst = 0.0
        for batch, ref in zip(self.batches[kv], self.refs[kv]):
            out = torch.full_like(ref, float("nan"))
            out.copy_(run_fn(batch, cfg)())
            worst = max(worst, rel_err(out, ref) if out.isfinite().all() else math.inf)
        return worst


# ---- sweep ----------------------------------------------------------------------------------------------
def launch_grid(kv: str) -> list[DecodeConfig]:
    """Key tile x warps x Triton pipelining depth, 2 programs per SM; FP8 with fp16 dot products (and one launch
    with bf16 ones to compare). A first run swept more (results/decode-attention-2026-11-25-run1.json: tiles of
    32-128 keys, 4 or 8 warps, pipelining 2-4 deep or by hand, bf16 or fp16 dots over FP8) and these were its
    best."""
    if kv == "fp8":
        grid = [DecodeConfig(block_n=n, num_warps=w, num_stages=s, f16_dot=True)
                for n, w, s in itertools.product((64, 128), (4, 8), (2, 3))]  # fmt: skip
        return [*grid, DecodeConfig(block_n=128, num_stages=2)]
    return [DecodeConfig(block_n=n, num_stages=s) for n, s in itertools.product((32, 64, 128), (2, 3))]


def sweep(
    bench: Bench, kv: str, checker: Checker, timer: ColdTimer, log, limit: int | None
) -> tuple[list[dict], DecodeConfig]:
    """Phase 1: every launch of launch_grid (or its first `limit`) at the batch-1 tuning shapes. Phase 2: the two
    best with 1-8 programs per SM, the split count rounded up or down (whole waves), at every tuning shape.
    Returns the rows and the launch of the best geometric mean."""
    rows: list[dict] = []
    shapes = bench.shapes(TUNING_SHAPES)
    batches = {shape: paged_batch(bench, [shape[1]] * shape[0], kv, 7) for shape in shapes}

    def measure(cfg: DecodeConfig, on: list[tuple[int, int]], phase: int) -> float:
        err = checker(kv, cfg)
        times = {}
        for shape in on:
            times[shape] = timer(run_fn(batches[shape], cfg)) if err < 2e-2 else math.inf
            rows.append({"phase": phase, "kv": kv, "batch": shape[0], "context": shape[1], "config": asdict(cfg),
                         "rel_err": err, "us": times[shape],
                         "GB_s": bytes_read(batches[shape]) / times[shape] / 1e3})  # fmt: skip
        log(f"sweep {kv} p{phase} {cfg} err {err:.1e} " + " ".join(f"{t:.1f}" for t in times.values()) + " us")
        return math.exp(sum(math.log(t) for t in times.values()) / len(times))

    batch1 = [s for s in shapes if s[0] == 1]
    phase1 = sorted((measure(cfg, batch1, 1), i, cfg) for i, cfg in enumerate(launch_grid(kv)[:limit]))
    phase2 = []
    for _, _, cfg in phase1[:2]:
        for per_sm, whole in itertools.product((1, 2, 3, 4, 6, 8), (False, True)):
            c = DecodeConfig(**{**asdict(cfg), "programs_per_sm": per_sm, "whole_waves": whole})
            phase2.append((measure(c, shapes, 2), len(phase2), c))
    return rows, min(phase2)[2]


# ---- timings --------------------------------------------------------------------------------------------
def timing_rows(bench: Bench, launches: dict[str, dict[str, DecodeConfig]], timer: ColdTimer, log) -> list[dict]:
    rows = []
    for (batch_size, context), kv in itertools.product(bench.shapes(TABLE_SHAPES), KV_DTYPES):
        batch = paged_batch(bench, [context] * batch_size, kv, 11)
        ref = reference(batch)
        for name, configs in launches.items():
            cfg = configs[kv]
            fn = run_fn(batch, cfg)
            us = timer(fn)
            gb_s = bytes_read(batch) / us / 1e3
            rows.append({"kv": kv, "batch": batch_size, "context": context, "launch": name, "config": asdict(cfg),
                         "rel_err": rel_err(fn(), ref), "us": us, "GB_s": gb_s,
                         "fraction_of_hbm": gb_s * 1e9 / HBM_BYTES_PER_S})  # fmt: skip
            log(f"time B={batch_size} ctx={context} {kv} {name}: {us:.1f} us {gb_s:.0f} GB/s")
    return rows


def print_timings(rows: list[dict]) -> None:
    names = list(dict.fromkeys(r["launch"] for r in rows))
    print("| batch | context | " + " | ".join(f"{kv} {n} us (of HBM)" for kv in KV_DTYPES for n in names)
          + f" | fp8 vs bf16 ({names[-1]}) |")  # fmt: skip
    print("|---|---|" + "---:|" * (len(names) * len(KV_DTYPES) + 1))
    for batch_size, context in dict.fromkeys((r["batch"], r["context"]) for r in rows):
        cell = {(r["kv"], r["launch"]): r for r in rows if (r["batch"], r["context"]) == (batch_size, context)}
        cells = [f"{cell[kv, n]['us']:.1f} ({100 * cell[kv, n]['fraction_of_hbm']:.0f}%)" for kv in KV_DTYPES
                 for n in names]  # fmt: skip
        ratio = cell["bf16", names[-1]]["us"] / cell["fp8", names[-1]]["us"]
        print(f"| {batch_size} | {context} | " + " | ".join(cells) + f" | {ratio:.2f}x |")


# ---- engine ---------------------------------------------------------------------------------------------
def engine_runs(launches: dict[str, dict[str, DecodeConfig]], workdir: str, t0: float) -> dict:
    """quant.py's KV-cache comparison, once per launch (the table is set before the engine captures its graphs)."""
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from quant import kv_cache_comparison

    committed = dict(attention.DECODE_CONFIGS)
    result = {}
    try:
        for name, configs in launches.items():
            attention.DECODE_CONFIGS.clear()
            attention.DECODE_CONFIGS.update({KV_DTYPES[kv].itemsize: cfg for kv, cfg in configs.items()})
            result[name] = kv_cache_comparison(workdir, t0)
    finally:
        attention.DECODE_CONFIGS.clear()
        attention.DECODE_CONFIGS.update(committed)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", nargs="+", choices=PARTS, default=PARTS)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--context-divisor", type=int, default=1, help="divide every context (CPU checks)")
    parser.add_argument("--launches-limit", type=int, help="sweep only the first N launches (CPU checks)")
    parser.add_argument("--engine-launches", nargs="+", choices=LAUNCHES, default=["baseline", "table"])
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--workdir", default="/tmp/slimserve-quant-bench")
    args = parser.parse_args()
    bench = Bench(torch.device(args.device), args.context_divisor)
    result: dict = {
        "device": torch.cuda.get_device_name() if bench.device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "triton": triton.__version__,
        "command": " ".join([os.path.basename(sys.executable), *sys.argv]),
        "date": datetime.date.today().isoformat(),
        "shape": {"heads": HEADS, "kv_heads": KV_HEADS, "head_dim": HEAD_DIM, "block_size": BLOCK_SIZE},
    }
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"decode-attention-{result['date']}.json")
    t0 = time.perf_counter()

    def log(line: str) -> None:
        print(f"[{time.perf_counter() - t0:.0f}s] {line}", flush=True)

    def save() -> None:  # after every part: a run cut short keeps what it measured
        with open(path, "w") as f:
            json.dump(result, f, indent=2)

    table = {kv: attention.DECODE_CONFIGS.get(dtype.itemsize, DecodeConfig()) for kv, dtype in KV_DTYPES.items()}
    launches = {"baseline": {kv: DecodeConfig() for kv in KV_DTYPES}}
    if table != launches["baseline"]:
        launches["table"] = table
    checker = Checker(bench) if {"checks", "sweep"} & set(args.parts) else None
    if "checks" in args.parts:
        result["checks"] = [{"kv": kv, "launch": name, "config": asdict(cfgs[kv]), "rel_err": checker(kv, cfgs[kv])}
                            for name, cfgs in launches.items() for kv in KV_DTYPES]  # fmt: skip
        for r in result["checks"]:
            log(f"check {r['kv']} {r['launch']}: rel_err {r['rel_err']:.2e}")
        save()
    timer = ColdTimer(bench.device)
    if "sweep" in args.parts:
        result["sweep"], launches["tuned"] = [], {}
        for kv in KV_DTYPES:
            rows, best = sweep(bench, kv, checker, timer, log, args.launches_limit)
            result["sweep"] += rows
            launches["tuned"][kv] = best
            log(f"tuned {kv}: {best}")
        result["tuned"] = {kv: asdict(cfg) for kv, cfg in launches["tuned"].items()}
        save()
    if "timings" in args.parts:
        result["timings"] = timing_rows(bench, launches, timer, log)
        save()
    if "engine" in args.parts:
        del checker, timer
        gc.collect()
        torch.cuda.empty_cache()
        chosen = {name: launches[name] for name in args.engine_launches if name in launches}
        result["engine"] = engine_runs(chosen, args.workdir, t0)
        save()

    print(f"\nwrote {path}\n")
    if "tuned" in result:
        for kv, cfg in result["tuned"].items():
            print(f"tuned {kv}: {cfg}")
    if "timings" in result:
        print_timings(result["timings"])
    for name, r in result.get("engine", {}).items():
        print(f"engine ({name} launch): decode at 32K, bf16 KV {r['auto']['decode_tok_s']:.1f} tok/s "
              f"({100 * r['auto']['roofline_fraction']:.0f}% of roofline), FP8 KV {r['fp8']['decode_tok_s']:.1f} "
              f"({100 * r['fp8']['roofline_fraction']:.0f}%): {r['decode_32k_speedup']:.2f}x; FP8 holds "
              f"{r['tokens_ratio']:.2f}x the tokens")  # fmt: skip
    checks = [r["rel_err"] for r in result.get("checks", []) + result.get("sweep", []) + result.get("timings", [])]
    print(f"checks: {sum(e < 2e-2 for e in checks)}/{len(checks)} within 2e-2 of the reference")


if __name__ == "__main__":
    main()
