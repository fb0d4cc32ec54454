"""Integer-weight decode GEMVs on a GPU: checked against the plain-torch reference, then timed per launch
configuration at the real projection shapes, against bf16 cuBLAS and the HBM limit.

For Llama-3.1-8B and Llama-3.2-1B projections (q|k|v, o, gate|up, down) and 1, 4 and 16 tokens:
  * every format (W4A16 g128, W4A16 asymmetric g32, W8A16 g128, W4A8 g128, W2A16 asymmetric g64) through
    quant_gemm_triton's own choice against quant_gemm_ref (relative error, and every output element written);
  * the swept formats (W4A16 g128 by default): the CUDA-core GEMV (int_gemv_triton) over a grid of tiles,
    warps, prefetching and split-K densities, one token;
  * the other formats and token counts over the best configurations of the first swept format, and the
    tensor-core kernel (the GEMM with K split) over its column tiles;
  * bf16 F.linear (cuBLAS) on the dense weight of the same shape.
Times are CUDA-graph replays with a cold L2 (what a captured decode step sees). "of HBM" is the bytes a launch
must move (packed weights, scales, zero points, activations, output) over 3.0 TB/s. The JSON keeps every
measurement and, per format and shape, the fastest configuration (`configs`), the table quant_gemm.py takes.

usage: python benchmarks/quant_gemv.py [--models llama-3.1-8b llama-3.2-1b] [--tokens 1 4 16] [--out DIR]
           [--sweep-formats W4A16] [--formats ...] [--block-n ...] [--block-k ...] [--warps ...] [--programs-per-sm ...]
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import json
import os
import sys
import time
from collections.abc import Callable
from dataclasses import asdict

import torch
import triton

from slimserve.kernels.fp8_quant import quantize_fp8_triton
from slimserve.kernels.quant_gemm import GemvConfig, int_gemv_triton, quant_gemm_triton
from slimserve.kernels.quant_gemm_ref import QuantWeight, pack_codes, quant_gemm_ref

HBM_BYTES_PER_S = 3.0e12
PROJECTIONS = {
    "llama-3.1-8b": [("qkv", 6144, 4096), ("o", 4096, 4096), ("gate_up", 28672, 4096), ("down", 4096, 14336)],
    "llama-3.2-1b": [("qkv", 3072, 2048), ("o", 2048, 2048), ("gate_up", 16384, 2048), ("down", 2048, 8192)],
}
# name: (bits, group size, zero points, FP8 activations)
FORMATS = {"W4A16": (4, 128, False, False), "W4A16-g32-asym": (4, 32, True, False),
           "W8A16": (8, 128, False, False), "W4A8": (4, 128, False, True),
           "W2A16-g64-asym": (2, 64, True, False)}  # fmt: skip
TOP = 8  # configurations carried from the first swept format to the other formats and token counts


def random_weight(n: int, k: int, fmt: str) -> QuantWeight:
    bits, group, zeros, _ = FORMATS[fmt]
    codes = torch.randint(0, 1 << bits, (n, k), device="cuda")
    scales = (torch.rand(n, k // group, device="cuda") * 2e-3 + 1e-3).bfloat16()
    z = torch.randint(0, 1 << bits, (n, k // group), device="cuda").bfloat16() if zeros else None
    return QuantWeight(pack_codes(codes, bits), scales, z, bits, group, k, n).input_major()


def nbytes(w: QuantWeight, m: int) -> int:
    zeros = 0 if w.zeros is None else w.zeros.nbytes
    return w.qweight.nbytes + w.scales.nbytes + zeros + 2 * m * (w.in_features + w.out_features)


class Timer:
    """Microseconds per call, replayed from a CUDA graph of `reps` (L2 flush, call) pairs minus the flushes."""

    def __init__(self, reps: int = 10, replays: int = 7) -> None:
        self.reps, self.replays = reps, replays
        self.flush = torch.empty(2 * torch.cuda.get_device_properties().L2_cache_size, dtype=torch.int8, device="cuda")
        self.flush_us = self._replay_us(lambda: None)

    def _replay_us(self, fn: Callable[[], object]) -> float:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for _ in range(self.reps):
                self.flush.zero_()
                fn()
        graph.replay()
        times = []
        for _ in range(self.replays):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            graph.replay()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) * 1e3 / self.reps)
        return sorted(times)[len(times) // 2]

    def __call__(self, fn: Callable[[], object]) -> float:
        fn()  # compile outside the capture
        torch.cuda.synchronize()
        return max(self._replay_us(fn) - self.flush_us, 0.01)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def inputs(m: int, k: int, fmt: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    x = torch.randn(m, k, device="cuda").bfloat16()
    return quantize_fp8_triton(x) if FORMATS[fmt][3] else (x, None)


def check(fmt: str, n: int, k: int, m: int, fn: Callable[..., torch.Tensor], w: QuantWeight) -> float:
    """Relative error against the reference on fresh inputs; NaN if an element was left unwritten."""
    x, xs = inputs(m, k, fmt)
    out = fn(x, w, xs)
    err = rel_err(out, quant_gemm_ref(x, w, xs, out.dtype))
    left = w.counters is not None and bool(w.counters.any())
    return float("nan") if left or not torch.isfinite(out).all() else err


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", choices=sorted(PROJECTIONS), default=list(PROJECTIONS))
    parser.add_argument("--tokens", nargs="+", type=int, default=[1, 4, 16])
    parser.add_argument(
        "--sweep-formats",
        nargs="+",
        choices=list(FORMATS),
        default=["W4A16"],
        help="formats swept over every configuration (one token); the others take the best few",
    )
    parser.add_argument("--formats", nargs="+", choices=list(FORMATS), default=list(FORMATS))
    parser.add_argument("--block-n", nargs="+", type=int, default=[32, 64, 128, 256])
    parser.add_argument("--block-k", nargs="+", type=int, default=[128, 256, 512])
    parser.add_argument("--warps", nargs="+", type=int, default=[4, 8])
    parser.add_argument("--programs-per-sm", nargs="+", type=int, default=[1, 2, 4, 8])
    parser.add_argument("--tensor-core-block-n", nargs="+", type=int, default=[32, 64, 128])
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    args = parser.parse_args()
    torch.manual_seed(0)
    t0 = time.perf_counter()
    timer = Timer()
    rows: list[dict] = []
    shapes = [(model, proj, n, k) for model in args.models for proj, n, k in PROJECTIONS[model]]

    def record(model, proj, m, fmt, kernel, config, us, nb, err=None) -> dict:
        row = dict(model=model, proj=proj, m=m, format=fmt, kernel=kernel, config=config, us=us,
                   GB_s=nb / us / 1e3, of_hbm=nb / us / 1e-6 / HBM_BYTES_PER_S, rel_err=err)  # fmt: skip
        rows.append(row)
        return row

    date = datetime.date.today().isoformat()
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"quant-gemv-{date}.json")
    configs: dict[str, dict[str, dict]] = {}
    result = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
                  command=" ".join([os.path.basename(sys.executable), *sys.argv]), date=date,
                  hbm_bytes_per_s=HBM_BYTES_PER_S, configs=configs, rows=rows)  # fmt: skip

    def save() -> None:  # after each stage: a run cut short keeps what it measured (compact: thousands of rows)
        with open(path, "w") as f:
            json.dump(result, f, separators=(",", ":"))

    # 1. The sweep of the CUDA-core GEMV, one token: every configuration, every shape, each swept format.
    sweep = [
        GemvConfig(block_n=bn, block_k=bk, num_warps=warps, prefetch=prefetch, programs_per_sm=pps)
        for bn, bk, warps, prefetch in itertools.product(args.block_n, args.block_k, args.warps, (False, True))
        for pps in args.programs_per_sm
    ]
    top: list[GemvConfig] = []
    for fmt in args.sweep_formats:
        bits, group = FORMATS[fmt][:2]
        scores: dict[int, list[float]] = {i: [] for i in range(len(sweep))}
        for model, proj, n, k in shapes:
            w = random_weight(n, k, fmt)
            x, xs = inputs(1, k, fmt)
            times = []
            for cfg in sweep:
                us = timer(lambda x=x, xs=xs, w=w, cfg=cfg: int_gemv_triton(x, w, xs, config=cfg))
                times.append(record(model, proj, 1, fmt, "sweep", asdict(cfg), us, nbytes(w, 1))["us"])
            best = min(times)
            for i, us in enumerate(times):
                scores[i].append(us / best)
            cfg = sweep[times.index(best)]
            err = check(fmt, n, k, 1, lambda x, w, xs, cfg=cfg: int_gemv_triton(x, w, xs, config=cfg), w)
            record(model, proj, 1, fmt, "gemv", asdict(cfg), best, nbytes(w, 1), err)
            configs.setdefault(fmt, {})[f"{bits},{group},{n},{k}"] = asdict(cfg)
            save()
            print(f"[{time.perf_counter() - t0:.0f}s] sweep {fmt} {model} {proj}: best {best:.1f} us {cfg}", flush=True)
        # Configurations ranked by their geometric-mean slowdown against each shape's best.
        mean = {i: float(torch.tensor(s).log().mean().exp()) for i, s in scores.items()}
        ranked = [sweep[i] for i in sorted(mean, key=mean.get)]
        print(f"top {fmt}:", *(f"{mean[sweep.index(c)]:.3f} {c}" for c in ranked[:TOP]), sep="\n  ", flush=True)
        top = top or ranked[:TOP]

    # 2. Every format and token count: the default routing, the top configurations, tensor-core tiles, bf16.
    summary = []
    for model, proj, n, k in shapes:
        dense = torch.randn(n, k, device="cuda").bfloat16() * 0.02
        for m in args.tokens:
            x, _ = inputs(m, k, "W4A16")
            bf16_us = timer(lambda x=x, dense=dense: torch.nn.functional.linear(x, dense))
            record(model, proj, m, "bf16", "cublas", None, bf16_us, 2 * (n * k + m * (n + k)))
            for fmt in args.formats:
                w = random_weight(n, k, fmt)
                x, xs = inputs(m, k, fmt)
                nb = nbytes(w, m)
                auto_err = check(fmt, n, k, m, quant_gemm_triton, w)
                auto = record(model, proj, m, fmt, "auto", None,
                              timer(lambda x=x, xs=xs, w=w: quant_gemm_triton(x, w, xs)), nb, auto_err)  # fmt: skip
                gemv = []
                for cfg in top:
                    us = timer(lambda x=x, xs=xs, w=w, cfg=cfg: int_gemv_triton(x, w, xs, config=cfg))
                    gemv.append(record(model, proj, m, fmt, "gemv", asdict(cfg), us, nb))
                tensor_core = []
                for block_n in args.tensor_core_block_n:
                    us = timer(lambda x=x, xs=xs, w=w, bn=block_n: quant_gemm_triton(x, w, xs, block_n=bn))
                    tensor_core.append(record(model, proj, m, fmt, "tensor-core", {"block_n": block_n}, us, nb))
                best = min(gemv, key=lambda r: r["us"])
                cfg = GemvConfig(**best["config"])
                best["rel_err"] = check(fmt, n, k, m, lambda x, w, xs, c=cfg: int_gemv_triton(x, w, xs, config=c), w)
                if m == 1 and fmt not in args.sweep_formats:  # the swept formats keep their full sweep's pick
                    bits, group = FORMATS[fmt][:2]
                    configs.setdefault(fmt, {})[f"{bits},{group},{n},{k}"] = best["config"]
                tc = min(tensor_core, key=lambda r: r["us"])
                summary.append((model, proj, m, fmt, bf16_us, auto, best, tc))
            print(f"[{time.perf_counter() - t0:.0f}s] {model} {proj} m={m} done", flush=True)
            save()
    print(f"\nwrote {path}\n")
    print("| model | proj | M | format | bf16 us | auto us | auto of HBM | vs bf16 | best GEMV us | of HBM "
          "| tensor-core us | rel err |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for model, proj, m, fmt, bf16_us, auto, best, tc in summary:
        print(f"| {model} | {proj} | {m} | {fmt} | {bf16_us:.1f} | {auto['us']:.1f} | {100 * auto['of_hbm']:.0f}% "
              f"| {bf16_us / auto['us']:.2f}x | {best['us']:.1f} | {100 * best['of_hbm']:.0f}% | {tc['us']:.1f} "
              f"| {max(auto['rel_err'], best['rel_err']):.1e} |")  # fmt: skip
    bad = [r for r in rows if r["rel_err"] is not None and not r["rel_err"] < 2e-2]
    checked = sum(r["rel_err"] is not None for r in rows)
    print(f"\nchecks: {checked - len(bad)}/{checked} within 2e-2 of the reference")


if __name__ == "__main__":
    main()
