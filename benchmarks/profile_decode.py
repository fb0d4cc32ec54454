"""Where a batch-1 decode window spends its time: host time per phase of LLMEngine.step and the device
time of the graph replays, on a random-weight model (GPU)."""

import argparse
import time

import torch

from slimserve import LLM, SamplingParams


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("folder", help="HF folder (e.g. written by benchmarks/engine.py)")
    parser.add_argument("--batch", type=int, default=1)
    args = parser.parse_args()
    llm = LLM(args.folder, dtype="bfloat16", max_model_len=2048, gpu_memory_utilization=0.6)
    engine, runner = llm.engine, llm.engine.runner
    params = SamplingParams(temperature=0.0, max_tokens=400, ignore_eos=True)
    for i in range(args.batch):
        engine.add_request(str(i), list(range(3, 131)), params, stream=False)
    engine.step()  # prefill
    timings = {"schedule": 0.0, "execute": 0.0, "postprocess": 0.0}
    original_execute, original_schedule = runner.execute, engine.scheduler.schedule

    def timed(name, fn):
        def wrapper(*a, **k):
            t = time.perf_counter()
            out = fn(*a, **k)
            timings[name] += time.perf_counter() - t
            return out

        return wrapper

    runner.execute = timed("execute", original_execute)
    engine.scheduler.schedule = timed("schedule", original_schedule)
    torch.cuda.synchronize()
    start = time.perf_counter()
    tokens = 0
    while engine.has_unfinished_requests():
        tokens += sum(len(out.new_token_ids) for out in engine.step())
    total = time.perf_counter() - start
    print(
        f"{tokens} tokens in {total * 1e3:.1f} ms: {tokens / total:.0f} tok/s, "
        f"schedule {timings['schedule'] * 1e3:.1f} ms, execute {timings['execute'] * 1e3:.1f} ms"
    )
    graph = runner.graphs[min(b for b in runner.graphs if b >= args.batch)]
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(100):
        graph.replay()
    torch.cuda.synchronize()
    print(f"graph replay alone: {(time.perf_counter() - t) * 10:.3f} ms per step")
    # Host cost of one decode window's per-step work, without the graph.
    n = args.batch
    sampling = runner.sampler.prepare([params] * n, [None] * n)
    logits = runner.g_logits[graph_bs := min(b for b in runner.graphs if b >= n)][:n]
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(100):
        runner.sampler.sample(logits, sampling, None)
    torch.cuda.synchronize()
    print(f"sampler alone: {(time.perf_counter() - t) * 10:.3f} ms per step (graph bs {graph_bs})")
    print_kernel_times(graph)


def print_kernel_times(graph: torch.cuda.CUDAGraph, replays: int = 20) -> None:
    """Device time per kernel of one decode step, from the profiler's trace of graph replays."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(replays):
            graph.replay()
        torch.cuda.synchronize()
    totals: dict[str, list[float]] = {}
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            totals.setdefault(event.name[:90], []).append(event.device_time)
    step_us = sum(sum(times) for times in totals.values()) / replays
    print(f"kernel time per step: {step_us:.1f} us (the rest of a replay is gaps between kernels)")
    print(f"{'kernel':<90} {'launches':>8} {'us/step':>8} {'us each':>8}")
    for name, times in sorted(totals.items(), key=lambda kv: -sum(kv[1])):
        print(f"{name:<90} {len(times) / replays:8.1f} {sum(times) / replays:8.1f} {sum(times) / len(times):8.2f}")


if __name__ == "__main__":
    main()
