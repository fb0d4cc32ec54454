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

FP8 experts in the same run: the layer with FP8 banks (per-channel scales), weight-only and with dynamic
per-token FP8 activations (its bytes limit counts one byte per expert weight), and the engine's batch-1
decode and throughput with FP8 experts (compressed-tensors FP8 on the expert projections only, random FP8
weights drawn at load, `load_format="dummy"`) beside the bf16 experts.

usage: python benchmarks/moe.py [--layers 8] [--skip-hf] [--fp8 dynamic|weight-only|none]
       python benchmarks/moe.py --tiny   (a tiny shape, to check the script on any machine)
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import random
import shutil
import sys
import time

import torch
import transformers
from transformers import AutoConfig, AutoModelForCausalLM

from slimserve import LLM
from slimserve.checkpoint.random_model import save_random_model
from slimserve.kernels.fused_moe import fused_moe
from slimserve.kernels.fused_moe_ref import Fp8ExpertScales, fused_moe_ref
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


def decode_bytes_per_step(c, context_len: int, expert_bytes: float = 2.0) -> float:
    """Bytes a batch-1 decode step must read, bf16 (experts at `expert_bytes` per weight plus their fp32
    channel scales when FP8): attention, norms, router and the top-k experts of each layer, the LM head, and
    the KV cache of the context."""
    h, layers = c.hidden_size, c.num_hidden_layers
    q, kv = c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim
    experts = c.num_experts_per_tok * 3 * h * c.moe_intermediate_size
    if expert_bytes != 2.0:
        scales = c.num_experts_per_tok * (2 * c.moe_intermediate_size + h) * 4
        experts = (experts * expert_bytes + scales) / 2.0
    per_layer = h * (q + 2 * kv) + q * h + h * c.num_experts + experts + 2 * h + 2 * c.head_dim
    return 2.0 * (layers * per_layer + c.vocab_size * h + h + 2 * layers * kv * context_len)


# ---- the MoE layer alone ----------------------------------------------------------------------------
def time_layer(x, w13, w2, weights, ids, scales: Fp8ExpertScales | None = None) -> float:
    """Seconds per call; on CUDA replayed from a CUDA graph, as the engine runs decode steps."""
    if x.device.type != "cuda":
        start = time.perf_counter()
        fused_moe(x, w13, w2, weights, ids, scales=scales)
        return time.perf_counter() - start
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fused_moe(x, w13, w2, weights, ids, scales=scales)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fused_moe(x, w13, w2, weights, ids, scales=scales)
    graph.replay()
    start = sync_time()
    for _ in range(20):
        graph.replay()
    return (sync_time() - start) / 20


def fp8_banks(w13: torch.Tensor, w2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """FP8 E4M3 banks with one scale per (expert, output channel), as compressed-tensors' channel strategy."""
    out = []
    for w in (w13, w2):
        scale = w.float().abs().amax(dim=2) / 448.0
        out += [(w.float() / scale[..., None]).to(torch.float8_e4m3fn), scale]
    return out[0], out[2], out[1], out[3]


def moe_layer(c, device: str, dtype: torch.dtype, token_counts: list[int], fp8: bool = True) -> list[dict]:
    """Rows for bf16 experts and, with `fp8`, FP8 experts weight-only and with dynamic FP8 activations (the
    same routed tokens); each row's error is against the plain-torch reference of its own weights."""
    g = torch.Generator(device).manual_seed(0)
    e, h, inter, k = c.num_experts, c.hidden_size, c.moe_intermediate_size, c.num_experts_per_tok
    w13 = torch.randn(e, 2 * inter, h, generator=g, device=device).mul_(h**-0.5).to(dtype)
    w2 = torch.randn(e, h, inter, generator=g, device=device).mul_(inter**-0.5).to(dtype)
    router = torch.randn(e, h, generator=g, device=device).mul_(h**-0.5).to(dtype)
    q13, q2, s13, s2 = fp8_banks(w13, w2)
    variants = [("bf16" if dtype == torch.bfloat16 else str(dtype)[6:], w13, w2, None, dtype.itemsize)]
    if fp8:
        variants += [
            ("fp8 weight-only", q13, q2, Fp8ExpertScales(s13, s2), 1),
            ("fp8 w8a8 dynamic", q13, q2, Fp8ExpertScales(s13, s2, "dynamic"), 1),
        ]
    rows = []
    for t in token_counts:
        x = torch.randn(t, h, generator=g, device=device).to(dtype)
        weights, ids = select_experts(x @ router.T, k, renormalize=True, round_weights=True)
        hit = ids.unique().numel()
        full = fused_moe_ref(x, w13, w2, weights, ids).float()
        for name, a, b, scales, weight_bytes in variants:
            out = fused_moe(x, a, b, weights, ids, scales=scales)
            ref = fused_moe_ref(x, a, b, weights, ids, scales=scales)
            err = ((out.float() - ref.float()).abs().max() / ref.float().abs().max()).item()
            seconds = time_layer(x, a, b, weights, ids, scales)
            scale_bytes = 0 if scales is None else hit * (2 * inter + h) * 4
            bytes_limit = (hit * 3 * h * inter * weight_bytes + scale_bytes) / HBM_BYTES_PER_S
            flop_rate = BF16_FLOP_PER_S * (2 if name.endswith("dynamic") else 1)  # FP8 tensor cores: twice bf16
            flop_limit = 2 * t * k * 3 * h * inter / flop_rate
            limit = max(bytes_limit, flop_limit)
            rows.append(
                dict(
                    experts=name, tokens=t, experts_hit=hit, us=seconds * 1e6, limit_us=limit * 1e6,
                    fraction=limit / seconds, rel_err=err,
                    # Quantization error of the FP8 layer against the bf16 experts it came from.
                    rel_err_vs_bf16=((ref.float() - full).norm() / full.norm()).item(),
                )
            )  # fmt: skip
            print(f"MoE layer, {t} tokens: {rows[-1]}", flush=True)
    return rows


def fp8_experts_folder(folder: str, out: str, act: str) -> str:
    """A copy of `folder` without weights whose config.json marks the expert projections (only) as
    compressed-tensors FP8, per channel, weight-only or with dynamic per-token activations."""
    os.makedirs(out, exist_ok=True)
    for name in os.listdir(folder):
        if not name.endswith(".safetensors") and name != "config.json":
            shutil.copy(os.path.join(folder, name), out)
    with open(os.path.join(folder, "config.json")) as f:
        config = json.load(f)
    weights = dict(num_bits=8, type="float", symmetric=True, strategy="channel", dynamic=False)
    acts = dict(num_bits=8, type="float", symmetric=True, strategy="token", dynamic=True)
    config["quantization_config"] = {
        "quant_method": "compressed-tensors",
        "format": "float-quantized",
        "quantization_status": "compressed",
        "config_groups": {
            "experts": {
                "targets": ["re:.*mlp\\.experts\\..*"],
                "weights": weights,
                "input_activations": acts if act == "dynamic" else None,
                "format": "float-quantized",
            }
        },
        "ignore": ["lm_head"],
    }
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    return out


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


def start_slimserve(folder: str, dtype: torch.dtype, result: dict, **options) -> LLM:
    """The engine with CUDA graphs; if capturing them fails, the failure is recorded and it runs eager."""
    t0 = time.perf_counter()
    try:
        llm = LLM(folder, dtype=dtype, max_model_len=2048, gpu_memory_utilization=0.5, **options)
    except Exception as e:
        result["cuda_graph_error"] = f"{type(e).__name__}: {e}"[:500]
        print(f"CUDA graphs failed, running eager: {result['cuda_graph_error']}", flush=True)
        gc.collect()
        llm = LLM(folder, dtype=dtype, max_model_len=2048, gpu_memory_utilization=0.5, enforce_eager=True, **options)
    result["slimserve_startup_s"] = time.perf_counter() - t0
    return llm


def run_slimserve(folder: str, dtype: torch.dtype, config, prompt, new_tokens: int, requests, result: dict,
                  expert_bytes: float = 2.0, **options) -> None:  # fmt: skip
    """Batch-1 decode (with its HBM roofline) and offline throughput through one engine, into `result`."""
    llm = start_slimserve(folder, dtype, result, **options)
    b1 = slimserve_batch1(llm, prompt, new_tokens)
    steps = [decode_bytes_per_step(config, 128 + i, expert_bytes) for i in range(1, new_tokens)]
    b1["roofline_tok_s"] = (new_tokens - 1) / (sum(steps) / HBM_BYTES_PER_S)
    b1["roofline_fraction"] = b1["decode_tok_s"] / b1["roofline_tok_s"]
    result["batch1"] = b1
    print(f"slimserve batch-1: {b1}", flush=True)
    result["throughput"] = slimserve_throughput(llm, requests)
    print(f"slimserve throughput: {result['throughput']}", flush=True)
    del llm
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


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
    parser.add_argument(
        "--fp8", choices=["dynamic", "weight-only", "none"], default="dynamic",
        help="engine run with FP8 experts: W8A8 with dynamic per-token activations, weight-only, or none",
    )  # fmt: skip
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
    result["moe_layer"] = moe_layer(config, device, dtype, [1, 7, 64, 512, 4096] if not args.tiny else [1, 9],
                                    fp8=args.fp8 != "none")  # fmt: skip
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

    bf16: dict = {}
    run_slimserve(folder, dtype, config, prompt, args.new_tokens, requests, bf16)
    result["slimserve_startup_s"] = bf16.pop("slimserve_startup_s")
    result["slimserve_batch1"], result["slimserve_throughput"] = bf16["batch1"], bf16["throughput"]
    save(result, path)
    if args.fp8 != "none":
        fp8 = {"activations": args.fp8}
        fp8_folder = fp8_experts_folder(folder, f"{folder}-fp8-{args.fp8}", args.fp8)
        run_slimserve(fp8_folder, dtype, config, prompt, args.new_tokens, requests, fp8, 1.0, load_format="dummy")
        fp8["speedup_batch1_vs_bf16"] = fp8["batch1"]["decode_tok_s"] / bf16["batch1"]["decode_tok_s"]
        fp8["speedup_throughput_vs_bf16"] = fp8["throughput"]["output_tok_s"] / bf16["throughput"]["output_tok_s"]
        result["slimserve_fp8_experts"] = fp8
        save(result, path)
    b1 = result["slimserve_batch1"]

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
    fp8 = result.get("slimserve_fp8_experts")
    if fp8:
        f1, ft = fp8["batch1"], fp8["throughput"]
        print("\n| engine, experts | batch-1 decode tok/s | throughput output tok/s |\n|---|---|---|")
        print(f"| bf16 experts | {b1['decode_tok_s']:.0f} ({100 * b1['roofline_fraction']:.0f}% of roofline) "
              f"| {tp['output_tok_s']:.0f} |")  # fmt: skip
        print(
            f"| FP8 experts ({fp8['activations']}) | {f1['decode_tok_s']:.0f} "
            f"({100 * f1['roofline_fraction']:.0f}% of roofline), {fp8['speedup_batch1_vs_bf16']:.2f}x "
            f"| {ft['output_tok_s']:.0f}, {fp8['speedup_throughput_vs_bf16']:.2f}x |"
        )
    print("\n| MoE layer experts | tokens | experts hit | us | hardware limit us | fraction | rel. error vs reference "
          "| rel. error vs bf16 experts |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|")
    for r in result["moe_layer"]:
        print(
            f"| {r['experts']} | {r['tokens']} | {r['experts_hit']} | {r['us']:.1f} | {r['limit_us']:.1f} "
            f"| {100 * r['fraction']:.0f}% | {r['rel_err']:.1e} | {r['rel_err_vs_bf16']:.1e} |"
        )


if __name__ == "__main__":
    main()
