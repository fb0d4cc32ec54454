"""Tensor and expert parallelism on the GPUs of one host: the same engine at tensor_parallel_size 1, 2, 4, 8
(as many as the machine has), for an 8B-class dense shape and an MoE shape (random bf16 weights).

For every world size N it reports
  * agreement with N = 1: greedy tokens of a few prompts and the logprobs of the chosen tokens (bf16: other
    GEMM splits and an all-reduce change rounding, so sequences may part at near-ties; where they part, the
    gap between the two candidates is reported, and the largest logprob difference before that);
  * batch-1 decode tok/s (128-token prompt, 256 greedy tokens) and offline throughput (requests with input
    and output lengths uniform in [100, 1024], temperature 1), with the scaling efficiency per GPU
    (throughput at N / (N x throughput at 1));
  * all-reduce time per decode step: NCCL all_reduce of one step's hidden states timed in a process group of
    N ranks, times the two all-reduces of every layer, against the measured step time.
For the MoE shape it also runs expert parallelism (experts split across ranks, tokens sent to them with
all-to-all) beside tensor parallelism at each N > 1.

NCCL's NVLink multicast stays off (NCCL_NVLS_ENABLE=0 and friends), as the machines here require.

usage: python benchmarks/multi_gpu.py [--shapes llama-3.1-8b qwen3-30b-a3b-16l] [--num-requests 256]
       python benchmarks/multi_gpu.py --device cpu --shapes tiny tiny-moe --world-sizes 1 2   (a quick check, gloo)
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import random
import sys

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from transformers import AutoConfig

from slimserve import LLM, SamplingParams
from slimserve.checkpoint.random_model import save_random_model

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from engine import SHAPES, make_requests, slimserve_batch1, slimserve_throughput, sync_time  # noqa: E402
from long_context import TINY  # noqa: E402
from moe import QWEN3_30B_A3B  # noqa: E402
from moe import TINY as TINY_MOE  # noqa: E402

for _name in ("NCCL_NVLS_ENABLE", "TORCH_SYMM_MEM_DISABLE_MULTICAST", "NVSHMEM_DISABLE_NVLS"):
    os.environ.setdefault(_name, "0" if _name == "NCCL_NVLS_ENABLE" else "1")

MULTI_GPU_SHAPES = {
    "tiny": TINY,
    "tiny-moe": TINY_MOE | dict(num_hidden_layers=2),
    # Qwen3-30B-A3B's shape (128 experts, top-8) with 16 of its 48 layers: every world size fits in time.
    "qwen3-30b-a3b-16l": QWEN3_30B_A3B | dict(num_hidden_layers=16),
    **SHAPES,
}


def is_moe(config) -> bool:
    return bool(getattr(config, "num_experts", 0) or getattr(config, "num_local_experts", 0))


# ---- agreement ----------------------------------------------------------------------------------------
def greedy_runs(llm: LLM, prompts: list[list[int]], new_tokens: int) -> list:
    params = SamplingParams(temperature=0.0, max_tokens=new_tokens, ignore_eos=True, logprobs=2)
    return [o.outputs[0] for o in llm.generate(prompts, params, use_tqdm=False)]


def agreement(base: list, other: list) -> dict:
    identical, gaps, max_diff = 0, [], 0.0
    for a, b in zip(base, other):
        first = next((i for i, (x, y) in enumerate(zip(a.token_ids, b.token_ids)) if x != y), None)
        common = len(a.token_ids) if first is None else first
        for i in range(common):
            t = a.token_ids[i]
            max_diff = max(max_diff, abs(a.logprobs[i][t] - b.logprobs[i][t]))
        if first is None:
            identical += 1
            continue
        top = a.logprobs[first]
        chosen = b.token_ids[first]
        gaps.append(top[a.token_ids[first]] - top[chosen] if chosen in top else float("inf"))
    return {
        "prompts": len(base),
        "identical": identical,
        "divergence_gaps": gaps,
        "max_logprob_diff_before_divergence": max_diff,
    }


# ---- all-reduce ---------------------------------------------------------------------------------------
def _all_reduce_rank(rank: int, world: int, port: int, backend: str, shapes: list[tuple[int, int]], out) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    device = torch.device("cuda", rank) if backend == "nccl" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend, rank=rank, world_size=world)
    times = []
    for rows, hidden in shapes:
        x = torch.randn(rows, hidden, dtype=torch.bfloat16, device=device)
        for _ in range(20):
            dist.all_reduce(x)
        iters = 200
        start = sync_time()
        for _ in range(iters):
            dist.all_reduce(x)
        times.append((sync_time() - start) / iters)
    if rank == 0:
        out.put(times)
    dist.barrier()
    dist.destroy_process_group()


def all_reduce_seconds(world: int, shapes: list[tuple[int, int]], device: torch.device) -> list[float]:
    """Seconds per all_reduce of a bf16 (rows, hidden) tensor over `world` ranks, for each shape."""
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    port = random.randint(20000, 40000)
    backend = "nccl" if device.type == "cuda" else "gloo"
    procs = [ctx.Process(target=_all_reduce_rank, args=(r, world, port, backend, shapes, out)) for r in range(world)]
    for p in procs:
        p.start()
    times = out.get(timeout=600)
    for p in procs:
        p.join(timeout=60)
    return times


# ---- one shape ----------------------------------------------------------------------------------------
def run_shape(name: str, args, device: torch.device) -> dict:
    config = AutoConfig.for_model(**MULTI_GPU_SHAPES[name])
    folder = os.path.join(args.workdir, name)
    if not os.path.isfile(os.path.join(folder, "config.json")):
        save_random_model(config, folder, dtype=torch.bfloat16, device=device.type, std=0.02)
    rng = random.Random(1)
    prompt = rng.sample(range(3, config.vocab_size), 128)
    check_prompts = [[rng.randrange(3, config.vocab_size) for _ in range(rng.randint(8, 200))] for _ in range(8)]
    requests = make_requests(config.vocab_size, args.num_requests, seed=0)
    engine_args = dict(
        dtype="bfloat16" if device.type == "cuda" else "float32",
        max_model_len=2048,
        gpu_memory_utilization=0.6,
        device=device.type,
    )
    modes = [("tp", False)] + ([("ep", True)] if is_moe(config) else [])
    result: dict = {"shape": MULTI_GPU_SHAPES[name], "runs": {}}
    base = None
    for world in args.world_sizes:
        for mode, expert_parallel in modes:
            if world == 1 and expert_parallel:
                continue
            key = f"{mode}{world}"
            print(f"[{name}] {key}: starting", flush=True)
            llm = LLM(folder, tensor_parallel_size=world, enable_expert_parallel=expert_parallel, **engine_args)
            run: dict = {}
            outs = greedy_runs(llm, check_prompts, args.check_tokens)
            if base is None:
                base = outs
            else:
                run["agreement_with_tp1"] = agreement(base, outs)
            run["batch1"] = slimserve_batch1(llm, prompt, args.decode_tokens)
            run["throughput"] = slimserve_throughput(llm, requests)
            del llm
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
            result["runs"][key] = run
            print(f"[{name}] {key}: {json.dumps(run)}", flush=True)
    one = result["runs"].get("tp1")
    for key, run in result["runs"].items():
        world = int(key[2:])
        if one is not None:
            run["throughput_scaling_efficiency"] = run["throughput"]["output_tok_s"] / (
                world * one["throughput"]["output_tok_s"]
            )
            run["batch1_speedup"] = run["batch1"]["decode_tok_s"] / one["batch1"]["decode_tok_s"]
        if world > 1:
            per_call = all_reduce_seconds(world, [(1, config.hidden_size)], device)[0]
            step_s = 1.0 / run["batch1"]["decode_tok_s"]
            per_step = 2 * config.num_hidden_layers * per_call
            run["all_reduce"] = {
                "per_call_us": 1e6 * per_call,
                "per_decode_step_ms": 1e3 * per_step,
                "share_of_decode_step": per_step / step_s,
            }
    return result


def table(results: dict) -> str:
    lines = [
        "| shape | mode | GPUs | batch-1 tok/s | speedup | throughput tok/s | scaling eff. | all-reduce / step | "
        "identical greedy | max logprob diff |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, r in results.items():
        for key, run in r["runs"].items():
            ar = run.get("all_reduce")
            ag = run.get("agreement_with_tp1")
            lines.append(
                f"| {name} | {key[:2]} | {key[2:]} | {run['batch1']['decode_tok_s']:.0f} | "
                f"{run.get('batch1_speedup', 1.0):.2f}x | {run['throughput']['output_tok_s']:.0f} | "
                f"{100 * run.get('throughput_scaling_efficiency', 1.0):.0f}% | "
                + (f"{ar['per_decode_step_ms']:.3f} ms ({100 * ar['share_of_decode_step']:.0f}%)" if ar else "-")
                + " | "
                + (f"{ag['identical']}/{ag['prompts']}" if ag else "-")
                + " | "
                + (f"{ag['max_logprob_diff_before_divergence']:.3f}" if ag else "-")
                + " |"
            )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--shapes", nargs="+", default=["llama-3.1-8b", "qwen3-30b-a3b-16l"], choices=sorted(MULTI_GPU_SHAPES)
    )
    parser.add_argument("--world-sizes", nargs="+", type=int, help="default: 1, 2, 4, 8 up to the GPUs present")
    parser.add_argument("--num-requests", type=int, default=256)
    parser.add_argument("--decode-tokens", type=int, default=256)
    parser.add_argument("--check-tokens", type=int, default=32)
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--workdir", default="/tmp/slimserve-bench")
    args = parser.parse_args()
    device = torch.device(args.device)
    available = torch.cuda.device_count() if device.type == "cuda" else 2
    args.world_sizes = args.world_sizes or [n for n in (1, 2, 4, 8) if n <= available]
    results = {name: run_shape(name, args, device) for name in args.shapes}
    record = {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "gpus": available if device.type == "cuda" else 0,
        "torch": torch.__version__,
        "command": " ".join([os.path.basename(sys.executable), *sys.argv]),
        "date": datetime.date.today().isoformat(),
        "results": results,
    }
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"multi-gpu-{record['date']}.json")
    with open(path, "w") as f:
        json.dump(record, f, indent=2)
    print(table(results))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
