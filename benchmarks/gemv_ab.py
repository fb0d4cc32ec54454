"""A/B of the integer decode GEMV against its version at an earlier commit, one process, one GPU: both kernels over
the same launch grid at the real projection shapes (one token), each shape's fastest launch of each, their
errors against the plain-torch reference, and a launch table of the current kernel's winners that
benchmarks/quant.py takes (`--gemv-configs`).

The baseline is slimserve/kernels/quant_gemm.py as committed at `--baseline` (read with `git show`), imported
beside the working tree's; times are CUDA-graph replays with a cold L2 (benchmarks/quant_gemv.py's Timer).

usage: python benchmarks/gemv_ab.py --baseline REV [--formats W4A16 W2A16-g64-asym] [--models llama-3.1-8b]
           [--lm-head] [--block-n 32 64] [--warps 4 8] [--stages 1] [--out DIR]
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import itertools
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from types import ModuleType

import torch
import triton

from slimserve.kernels.quant_gemm import GemvConfig, int_gemv_triton
from slimserve.kernels.quant_gemm_ref import quant_gemm_ref

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from quant_gemv import FORMATS, PROJECTIONS, Timer, inputs, nbytes, random_weight, rel_err  # noqa: E402

LM_HEAD = {"llama-3.1-8b": ("lm_head", 128256, 4096), "llama-3.2-1b": ("lm_head", 128256, 2048)}


def baseline_module(rev: str) -> ModuleType:
    """The GEMV module as committed at `rev`, importable beside the current one."""
    source = subprocess.run(["git", "show", f"{rev}:slimserve/kernels/quant_gemm.py"], check=True,
                            capture_output=True, text=True).stdout  # fmt: skip
    path = os.path.join(tempfile.mkdtemp(), "quant_gemm_baseline.py")
    with open(path, "w") as f:
        f.write(source)
    spec = importlib.util.spec_from_file_location("quant_gemm_baseline", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--baseline", required=True, help="commit whose quant_gemm.py is the baseline")
    parser.add_argument("--formats", nargs="+", choices=list(FORMATS), default=["W4A16"])
    parser.add_argument("--models", nargs="+", choices=sorted(PROJECTIONS), default=["llama-3.1-8b"])
    parser.add_argument("--lm-head", action="store_true", help="also the output head's shape (a quantized head)")
    parser.add_argument("--block-n", nargs="+", type=int, default=[32, 64], help="column tiles tried")
    parser.add_argument("--warps", nargs="+", type=int, default=[4, 8])
    parser.add_argument(
        "--stages", nargs="+", type=int, default=[1],
        help="K-loop pipeline depths tried (above 1: faster alone, slower in the decode step so far)",
    )  # fmt: skip
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    args = parser.parse_args()
    torch.manual_seed(0)
    old = baseline_module(args.baseline)
    grid = [
        GemvConfig(block_n=bn, block_k=bk, num_warps=warps, prefetch=prefetch, programs_per_sm=pps)
        for bn, bk, warps, prefetch, pps in itertools.product(
            args.block_n, (256, 512), args.warps, (False, True), (1, 2, 4)
        )
    ]
    # Software-pipelined K loops (num_stages > 1), the current kernel only: 32-column tiles, which won every
    # 8B shape before.
    pipelined = [
        GemvConfig(block_k=bk, num_warps=warps, num_stages=stages, programs_per_sm=pps)
        for bk, warps, stages, pps in itertools.product((256, 512), args.warps, args.stages, (1, 2, 4))
        if stages > 1
    ]
    kernels = {"baseline": (old.int_gemv_triton, old.GemvConfig, grid),
               "current": (int_gemv_triton, GemvConfig, grid + pipelined)}  # fmt: skip
    timer, t0 = Timer(), time.perf_counter()
    date = datetime.date.today().isoformat()
    configs: dict[str, dict[str, dict]] = {}
    rows: list[dict] = []
    for fmt, model in itertools.product(args.formats, args.models):
        bits, group = FORMATS[fmt][:2]
        shapes = PROJECTIONS[model] + ([LM_HEAD[model]] if args.lm_head else [])
        for proj, n, k in shapes:
            w = random_weight(n, k, fmt)
            x, xs = inputs(1, k, fmt)
            ref = quant_gemm_ref(x, w, xs, torch.bfloat16)
            row = dict(format=fmt, model=model, proj=proj, n=n, k=k, bytes=nbytes(w, 1))
            for name, (fn, config_cls, configs_tried) in kernels.items():
                launches = [config_cls(**asdict(cfg)) for cfg in configs_tried]  # each module's own config class
                times = [timer(lambda fn=fn, c=c, x=x, w=w, xs=xs: fn(x, w, xs, config=c)) for c in launches]
                fastest = times.index(min(times))
                err = rel_err(fn(x, w, xs, config=launches[fastest]), ref)
                row[f"{name}_us"], row[f"{name}_config"] = times[fastest], asdict(configs_tried[fastest])
                row[f"{name}_rel_err"] = err
            row["speedup"] = row["baseline_us"] / row["current_us"]
            rows.append(row)
            configs.setdefault(fmt, {})[f"{bits},{group},{n},{k}"] = row["current_config"]
            print(f"[{time.perf_counter() - t0:.0f}s] {fmt} {model} {proj}: baseline {row['baseline_us']:.1f} us, "
                  f"current {row['current_us']:.1f} us ({row['bytes'] / row['current_us'] / 1e6:.2f} TB/s), "
                  f"x{row['speedup']:.3f}", flush=True)  # fmt: skip
    result = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
                  command=" ".join([os.path.basename(sys.executable), *sys.argv]), date=date,
                  baseline=args.baseline, grid=[asdict(c) for c in grid], pipelined=[asdict(c) for c in pipelined],
                  configs=configs, rows=rows)  # fmt: skip
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"gemv-ab-{date}.json")
    with open(path, "w") as f:
        json.dump(result, f, indent=1)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
