"""Mixture-of-experts speed on a GPU: slimserve against transformers, same random-weight model, one process.

The model is Qwen3-30B-A3B's shape (128 experts, top-8, expert width 768, hidden 2048) with fewer layers.
Three parts:
  * the fused MoE layer alone at real shapes: Triton kernel vs the plain-torch reference (max error) and
    its time against the hardware limit (expert bytes / 3.0 TB/s for few tokens, FLOPs / 790 TFLOP/s
    for many);
  * batch-1 decode: a 128-token prompt, greedy tokens; tok/s and the fraction of the HBM roofline
    (weights of the chosen experts, attention, LM head and KV read per step);
  * offline throughput: requests with input and output lengths uniform in [100, 512], temperature 1.
transformers runs its grouped_mm and batched_mm expert implementations, dynamic and static cache; the
fastest counts.

usage: python benchmarks/moe.py [--layers 8] [--skip-hf]
       python benchmarks/moe.py --tiny   (a tiny shape, to check the script on any machine)
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import random
import sys
import time

import torch
import transformers
from transformers import AutoConfig, AutoModelForCausalLM

from slimserve import LLM
from slimserve.checkpoint.random_model import save_random_model
from slimserve.kernels.fused_moe import fused_moe
from slimserve.kernels.fused_moe_ref import fused_moe_ref
from slimserve.layers.moe import select_experts

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from engine import hf_batch1, hf_throughput, slimserve_batch1, slimserve_throughput, sync_time  # noqa: E402

HBM_BYTES_PER_S = 3.0e12
BF16_FLOP_PER_S = 790e12

QWEN3_30B_A3B = dict(
    model_type="qwen3_moe",
    vocab_size=151936,
    hidden_size=2048,
    intermediate_size=6144,
    moe_intermediate_size=768,
    num_experts=128,
    num_experts_per_tok=8,
    norm_topk_prob=True,
    num_hidden_layers=48,
    num_attention_heads=32,
    num_key_value_heads=4,
    head_dim=128,
    rms_norm_eps=1e-6,
    rope_theta=1000000.0,
    max_position_embeddings=40960,
    tie_word_embeddings=False,
    bos_token_id=1,
    eos_token_id=2,
)
TINY = QWEN3_30B_A3B | dict(
    vocab_size=512, hidden_size=64, moe_intermediate_size=32, num_experts=16, num_attention_heads=4, head_dim=16
)


def decode_bytes_per_step(c, context_len: int) -> float:
    """Bytes a batch-1 decode step must read, bf16: attention, norms, router and the top-k experts of each
    layer, the LM head, and the KV cache of the context."""
    h, layers = c.hidden_size, c.num_hidden_layers
    q, kv = c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim
    experts = c.num_experts_per_tok * 3 * h * c.moe_intermediate_size
    per_layer = h * (q + 2 * kv) + q * h + h * c.num_experts + experts + 2 * h + 2 * c.head_dim
    return 2.0 * (layers * per_layer + c.vocab_size * h + h + 2 * layers * kv * context_len)


# ---- the MoE layer alone ----------------------------------------------------------------------------
def time_layer(x, w13, w2, weights, ids) -> float:
    """Seconds per call; on CUDA replayed from a CUDA graph, as the engine runs decode steps."""
    if x.device.type != "cuda":
        start = time.perf_counter()
        fused_moe(x, w13, w2, weights, ids)
        return time.perf_counter() - start
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fused_moe(x, w13, w2, weights, ids)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fused_moe(x, w13, w2, weights, ids)
    graph.replay()
    start = sync_time()
    for _ in range(20):
        graph.replay()
    return (sync_time() - start) / 20


def moe_layer(c, device: str, dtype: torch.dtype, token_counts: list[int]) -> list[dict]:
    g = torch.Generator(device).manual_seed(0)
    e, h, inter, k = c.num_experts, c.hidden_size, c.moe_intermediate_size, c.num_experts_per_tok
    w13 = torch.randn(e, 2 * inter, h, generator=g, device=device).mul_(h**-0.5).to(dtype)
    w2 = torch.randn(e, h, inter, generator=g, device=device).mul_(inter**-0.5).to(dtype)
    router = torch.randn(e, h, generator=g, device=device).mul_(h**-0.5).to(dtype)
    rows = []
    for t in token_counts:
        x = torch.randn(t, h, generator=g, device=device).to(dtype)
        weights, ids = select_experts(x @ router.T, k, renormalize=True, round_weights=True)
        out = fused_moe(x, w13, w2, weights, ids)
        ref = fused_moe_ref(x, w13, w2, weights, ids)
        err = ((out.float() - ref.float()).abs().max() / ref.float().abs().max()).item()
        seconds = time_layer(x, w13, w2, weights, ids)
        hit = ids.unique().numel()
        bytes_limit = hit * 3 * h * inter * dtype.itemsize / HBM_BYTES_PER_S
        flop_limit = 2 * t * k * 3 * h * inter / BF16_FLOP_PER_S
        limit = max(bytes_limit, flop_limit)
        rows.append(
            dict(
                tokens=t, experts_hit=hit, us=seconds * 1e6, limit_us=limit * 1e6, fraction=limit / seconds, rel_err=err
            )
        )
        print(f"MoE layer, {t} tokens: {rows[-1]}", flush=True)
    return rows


def run_hf(folder: str, dtype: torch.dtype, device: str, prompt, new_tokens: int, requests, batch_size: int) -> dict:
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, attn_implementation="sdpa").to(device)
    settings = [("grouped_mm", None), ("grouped_mm", "static"), ("batched_mm", None)]
    if not hasattr(model, "set_experts_implementation"):  # older transformers: its one expert loop
        settings = [("default", None), ("default", "static")]
    runs = []
    for experts, cache in settings:
        run = {"experts": experts, "cache": cache or "dynamic"}
        try:
            if experts != "default":
                model.set_experts_implementation(experts)
            run |= hf_batch1(model, prompt, new_tokens, cache)
        except Exception as e:  # a setting that fails here is reported, not fatal
            run["error"] = f"{type(e).__name__}: {e}"[:300]
        runs.append(run)
        print(f"transformers batch-1: {run}", flush=True)
    ranked = sorted((r for r in runs if "decode_tok_s" in r), key=lambda r: -r["decode_tok_s"])
    # batched_mm gathers every pair's expert weights: fastest at batch 1, out of memory for batches; then
    # the next implementation runs the throughput workload.
    failed = []
    for experts in dict.fromkeys(r["experts"] for r in ranked):
        try:
            if experts != "default":
                model.set_experts_implementation(experts)
            throughput = hf_throughput(model, requests, batch_size) | {"experts": experts, "failed": failed}
            break
        except torch.OutOfMemoryError as e:
            failed.append({"experts": experts, "error": f"{type(e).__name__}: {e}"[:200]})
            torch.cuda.empty_cache()
    else:
        raise RuntimeError(f"no expert implementation of transformers ran the throughput workload: {failed}")
    print(f"transformers throughput: {throughput}", flush=True)
    return {"batch1": runs, "best_batch1": ranked[0], "throughput": throughput}


def start_slimserve(folder: str, dtype: torch.dtype, result: dict) -> LLM:
    """The engine with CUDA graphs; if capturing them fails, the failure is recorded and it runs eager."""
    t0 = time.perf_counter()
    try:
        llm = LLM(folder, dtype=dtype, max_model_len=2048, gpu_memory_utilization=0.5)
    except Exception as e:
        result["cuda_graph_error"] = f"{type(e).__name__}: {e}"[:500]
        print(f"CUDA graphs failed, running eager: {result['cuda_graph_error']}", flush=True)
        gc.collect()
        llm = LLM(folder, dtype=dtype, max_model_len=2048, gpu_memory_utilization=0.5, enforce_eager=True)
    result["slimserve_startup_s"] = time.perf_counter() - t0
    return llm


def save(result: dict, path: str) -> None:
    """Written after every part, so that a run cut short keeps what it measured."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path + ".tmp", "w") as f:
        json.dump(result, f, indent=2)
    os.replace(path + ".tmp", path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=8, help="decoder layers kept of the 48 (all MoE)")
    parser.add_argument("--num-requests", type=int, default=256)
    parser.add_argument("--hf-requests", type=int, default=64, help="requests timed through transformers")
    parser.add_argument("--hf-batch-size", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=128, help="batch-1 decode length")
    parser.add_argument("--skip-hf", action="store_true")
    parser.add_argument("--tiny", action="store_true", help="tiny shape and few requests: checks the script")
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--workdir", default="/tmp/slimserve-bench")
    args = parser.parse_args()

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    shape = (TINY if args.tiny else QWEN3_30B_A3B) | dict(num_hidden_layers=args.layers)
    name = f"qwen3-30b-a3b-{args.layers}l" + ("-tiny" if args.tiny else "")
    config = AutoConfig.for_model(**shape)
    if args.tiny:
        args.num_requests, args.hf_requests, args.hf_batch_size, args.new_tokens = 6, 4, 2, 8
    result = {
        "model_shape": name,
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "command": " ".join([os.path.basename(sys.executable), *sys.argv]),
        "date": datetime.date.today().isoformat(),
        "dtype": str(dtype).removeprefix("torch."),
        "shape": shape,
    }
    path = os.path.join(args.out, f"moe-{name}-{result['date']}.json")
    result["moe_layer"] = moe_layer(config, device, dtype, [1, 7, 64, 512, 4096] if not args.tiny else [1, 9])
    save(result, path)

    folder = os.path.join(args.workdir, name)
    if not os.path.isfile(os.path.join(folder, "config.json")):
        t0 = time.perf_counter()
        save_random_model(config, folder, dtype=dtype, device=device, std=0.02)
        print(f"random checkpoint written in {time.perf_counter() - t0:.0f} s", flush=True)
    rng = random.Random(0)
    prompt = [rng.randrange(3, config.vocab_size) for _ in range(128)]
    low, high = (8, 24) if args.tiny else (100, 512)
    lengths = [(rng.randint(low, high), rng.randint(low, high)) for _ in range(args.num_requests)]
    requests = [([rng.randrange(3, config.vocab_size) for _ in range(n)], m) for n, m in lengths]

    llm = start_slimserve(folder, dtype, result)
    b1 = slimserve_batch1(llm, prompt, args.new_tokens)
    steps = [decode_bytes_per_step(config, 128 + i) for i in range(1, args.new_tokens)]
    b1["roofline_tok_s"] = (args.new_tokens - 1) / (sum(steps) / HBM_BYTES_PER_S)
    b1["roofline_fraction"] = b1["decode_tok_s"] / b1["roofline_tok_s"]
    result["slimserve_batch1"] = b1
    print(f"slimserve batch-1: {b1}", flush=True)
    result["slimserve_throughput"] = slimserve_throughput(llm, requests)
    print(f"slimserve throughput: {result['slimserve_throughput']}", flush=True)
    save(result, path)
    del llm
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()

    if not args.skip_hf:
        hf = run_hf(folder, dtype, device, prompt, args.new_tokens, requests[: args.hf_requests], args.hf_batch_size)
        result["hf"] = hf
        result["speedup_batch1"] = b1["decode_tok_s"] / hf["best_batch1"]["decode_tok_s"]
        result["speedup_throughput"] = result["slimserve_throughput"]["output_tok_s"] / hf["throughput"]["output_tok_s"]

    save(result, path)
    print(f"\nwrote {path}\n")
    print_table(result)


def print_table(result: dict) -> None:
    hf = result.get("hf")
    b1, tp = result["slimserve_batch1"], result["slimserve_throughput"]
    print("| workload | slimserve | transformers | ratio |\n|---|---|---|---|")
    hf_b1 = f"{hf['best_batch1']['decode_tok_s']:.1f}" if hf else "-"
    hf_tp = f"{hf['throughput']['output_tok_s']:.0f}" if hf else "-"
    print(
        f"| batch-1 decode tok/s | {b1['decode_tok_s']:.0f} ({100 * b1['roofline_fraction']:.0f}% of roofline) "
        f"| {hf_b1} | {result.get('speedup_batch1', float('nan')):.1f}x |"
    )
    print(
        f"| throughput output tok/s | {tp['output_tok_s']:.0f} | {hf_tp} "
        f"| {result.get('speedup_throughput', float('nan')):.1f}x |"
    )
    print("\n| MoE layer tokens | experts hit | us | hardware limit us | fraction | rel. error vs reference |")
    print("|---|---|---|---|---|---|")
    for r in result["moe_layer"]:
        print(
            f"| {r['tokens']} | {r['experts_hit']} | {r['us']:.1f} | {r['limit_us']:.1f} "
            f"| {100 * r['fraction']:.0f}% | {r['rel_err']:.1e} |"
        )


if __name__ == "__main__":
    main()
