"""Online serving on a GPU: `slimserve serve` on a random-weight model of a real shape, loaded by the
benchmark client at several request rates, against offline LLM.generate on the same prompts.

The server runs as its own process (python -m slimserve.serve, which runs its engine in a child process)
and the client in this one, as a user would run them. At rate inf every request arrives at once, so the
server's output throughput there is comparable with the offline engine's: the ratio is what the HTTP
layer costs. The engine-loop numbers (step time, pauses between busy steps) are measured in the engine
process and read from /metrics.

usage: python benchmarks/serve.py --model llama-3.2-1b [--num-prompts 512] [--rates 4 16 inf]
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import time

import httpx2
import torch
from transformers import AutoConfig

from slimserve import LLM, SamplingParams
from slimserve.checkpoint.random_model import save_random_model
from slimserve.serve.bench_client import configure_bench_serve_parser, random_requests, run_benchmark

# The same engine settings for the server and for the offline run.
ENGINE = {"dtype": "bfloat16", "max_model_len": 2048, "gpu_memory_utilization": 0.6}


def engine_cli_args() -> list[str]:
    return [arg for key, value in ENGINE.items() for arg in (f"--{key.replace('_', '-')}", str(value))]


def model_shapes() -> dict:
    """The shapes benchmarks/engine.py measures (loaded by path: benchmarks/ is not a package)."""
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "engine.py")
    spec = importlib.util.spec_from_file_location("engine_benchmark", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.SHAPES


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(folder: str, port: int, log_path: str) -> subprocess.Popen:
    command = [
        sys.executable,
        "-m",
        "slimserve.serve",
        folder,
        "--port",
        str(port),
        "--log-level",
        "warning",
        "--served-model-name",
        "bench",
        *engine_cli_args(),
    ]
    log = open(log_path, "w")
    proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 600
    while True:
        try:
            if httpx2.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return proc
        except httpx2.TransportError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"the server did not start; see {log_path}")
        time.sleep(1)


def scrape(url: str) -> dict[str, float]:
    """The unlabelled samples of /metrics (enough for the engine-loop numbers)."""
    samples = {}
    for line in httpx2.get(f"{url}/metrics").text.splitlines():
        if line and not line.startswith("#") and "{" not in line:
            name, value = line.rsplit(" ", 1)
            samples[name] = float(value)
    return samples


def loop_stats(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    """Engine-loop health over one run: mean step, mean pause between busy steps, longest pause so far."""

    def mean_ms(name: str) -> float:
        count = after[f"{name}_count"] - before[f"{name}_count"]
        return 1e3 * (after[f"{name}_sum"] - before[f"{name}_sum"]) / count if count else float("nan")

    return {
        "steps": after["slimserve_engine_steps_total"] - before["slimserve_engine_steps_total"],
        "step_mean_ms": mean_ms("slimserve_engine_step_seconds"),
        "step_gap_mean_ms": mean_ms("slimserve_engine_step_gap_seconds"),
        "step_gap_max_ms_so_far": 1e3 * after["slimserve_engine_step_gap_max_seconds"],
        "preemptions": after["slimserve_num_preemptions_total"] - before["slimserve_num_preemptions_total"],
    }


def client_args(url: str, args: argparse.Namespace, rate: float, num_prompts: int) -> argparse.Namespace:
    parser = configure_bench_serve_parser(argparse.ArgumentParser())
    return parser.parse_args(
        [
            "--url",
            url,
            "--num-prompts",
            str(num_prompts),
            "--request-rate",
            str(rate),
            "--random-input-len",
            str(args.input_len),
            "--random-output-len",
            str(args.output_len),
            "--random-range-ratio",
            str(args.range_ratio),
            "--seed",
            "0",
            "--goodput",
            *args.goodput,
        ]
    )


def offline_throughput(folder: str, args: argparse.Namespace, vocab_size: int) -> dict:
    requests = random_requests(args.num_prompts, args.input_len, args.output_len, args.range_ratio, vocab_size, 0)
    llm = LLM(folder, **ENGINE)
    params = [SamplingParams(temperature=0.0, max_tokens=r.output_len, ignore_eos=True) for r in requests]
    llm.generate([r.prompt for r in requests[:16]], params[:16], use_tqdm=False)  # warm up
    torch.cuda.synchronize()
    start = time.perf_counter()
    outputs = llm.generate([r.prompt for r in requests], params, use_tqdm=False)
    torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    produced = sum(len(o.outputs[0].token_ids) for o in outputs)
    return {
        "elapsed_s": elapsed,
        "output_tokens": produced,
        "output_throughput": produced / elapsed,
        "request_throughput": len(requests) / elapsed,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="llama-3.2-1b", help="a shape from benchmarks/engine.py")
    parser.add_argument("--num-prompts", type=int, default=512)
    parser.add_argument("--input-len", type=int, default=512)
    parser.add_argument("--output-len", type=int, default=256)
    parser.add_argument("--range-ratio", type=float, default=0.5)
    parser.add_argument("--rates", nargs="+", type=float, default=[4.0, 16.0, float("inf")])
    parser.add_argument("--goodput", nargs="+", default=["ttft:500", "tpot:50"], help="SLOs in ms")
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--workdir", default="/tmp/slimserve-bench")
    args = parser.parse_args()

    shapes = model_shapes()
    config = AutoConfig.for_model(**shapes[args.model])
    folder = os.path.join(args.workdir, args.model)
    if not os.path.isfile(os.path.join(folder, "config.json")):
        save_random_model(config, folder, dtype=torch.bfloat16, device="cuda", std=0.02)
    result = {
        "model_shape": args.model,
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "command": " ".join([os.path.basename(sys.executable), *sys.argv]),
        "date": datetime.date.today().isoformat(),
        "dtype": "bfloat16",
        "engine": ENGINE,
        "workload": {
            "num_prompts": args.num_prompts,
            "input_len": args.input_len,
            "output_len": args.output_len,
            "range_ratio": args.range_ratio,
        },
        "online": {},
    }

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    os.makedirs(args.workdir, exist_ok=True)
    server = start_server(folder, port, os.path.join(args.workdir, "server.log"))
    try:
        asyncio.run(run_benchmark(client_args(url, args, float("inf"), 32)))  # warm up
        for rate in args.rates:
            before = scrape(url)
            run = asyncio.run(run_benchmark(client_args(url, args, rate, args.num_prompts)))
            run["engine_loop"] = loop_stats(before, scrape(url))
            result["online"][str(rate)] = run
            print(
                f"rate {rate}: {run['output_throughput']:.0f} output tok/s, TTFT median "
                f"{run['ttft_ms']['median']:.1f} ms, TPOT median {run['tpot_ms']['median']:.2f} ms, "
                f"failed {run['failed']}",
                flush=True,
            )
    finally:
        server.send_signal(signal.SIGINT)
        server.wait(timeout=60)

    result["offline"] = offline_throughput(folder, args, config.vocab_size)
    online_inf = result["online"].get("inf", {}).get("output_throughput")
    if online_inf:
        result["online_over_offline_at_inf"] = online_inf / result["offline"]["output_throughput"]

    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"serve-{args.model}-{result['date']}.json")
    with open(path, "w") as f:
        json.dump(result, f, indent=2)
    print("\n| rate (req/s) | output tok/s | TTFT median / p99 ms | TPOT median / p99 ms | ITL p99 ms | goodput |")
    print("|---|---|---|---|---|---|")
    for rate, run in result["online"].items():
        print(
            f"| {rate} | {run['output_throughput']:.0f} | {run['ttft_ms']['median']:.1f} / {run['ttft_ms']['p99']:.1f} "
            f"| {run['tpot_ms']['median']:.2f} / {run['tpot_ms']['p99']:.2f} | {run['itl_ms']['p99']:.2f} "
            f"| {run.get('request_goodput', float('nan')):.2f} |"
        )
    print(f"| offline | {result['offline']['output_throughput']:.0f} | | | | |")
    if online_inf:
        print(f"\nserver at rate inf / offline LLM.generate: {result['online_over_offline_at_inf']:.2f}")
    print(path)


if __name__ == "__main__":
    main()
