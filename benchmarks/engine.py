"""Engine speed on a GPU: slimserve against transformers, same random-weight model, one process.

Two workloads, as vLLM's benchmarks define them:
  * batch-1 decode: a 128-token prompt, 512 greedy tokens; tok/s and the fraction of the HBM roofline
    (weight + KV bytes read per step over the copy bandwidth);
  * offline throughput: 256 requests, input and output lengths uniform in [100, 1024], sampled at
    temperature 1; output tok/s. transformers runs padded batches (left padding, prompts sorted by
    length, each batch generating its longest output; only requested tokens count as output).

usage: python benchmarks/engine.py --model llama-3.2-1b [--hf-requests 64] [--skip-hf]
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
from transformers import AutoConfig, AutoModelForCausalLM

from slimserve import LLM, SamplingParams
from slimserve.checkpoint.random_model import save_random_model

HBM_BYTES_PER_S = 3.0e12

# The shapes of the real checkpoints (their config.json fields that matter for speed).
SHAPES = {
    "llama-3.2-1b": dict(
        model_type="llama",
        vocab_size=128256,
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=64,
        rms_norm_eps=1e-5,
        rope_theta=500000.0,
        max_position_embeddings=131072,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
        rope_scaling=dict(
            rope_type="llama3",
            factor=32.0,
            low_freq_factor=1.0,
            high_freq_factor=4.0,
            original_max_position_embeddings=8192,
        ),
    ),
    "llama-3.1-8b": dict(
        model_type="llama",
        vocab_size=128256,
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=128,
        rms_norm_eps=1e-5,
        rope_theta=500000.0,
        max_position_embeddings=131072,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
        rope_scaling=dict(
            rope_type="llama3",
            factor=8.0,
            low_freq_factor=1.0,
            high_freq_factor=4.0,
            original_max_position_embeddings=8192,
        ),
    ),
    "qwen3-0.6b": dict(
        model_type="qwen3",
        vocab_size=151936,
        hidden_size=1024,
        intermediate_size=3072,
        num_hidden_layers=28,
        num_attention_heads=16,
        num_key_value_heads=8,
        head_dim=128,
        rms_norm_eps=1e-6,
        rope_theta=1000000.0,
        max_position_embeddings=40960,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
    ),
}


def decode_bytes_per_step(config, context_len: int) -> float:
    """Bytes a batch-1 decode step must read: every weight once (the tied embedding as the LM head) plus
    the KV cache of the context, all bf16."""
    h, inter, layers = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    q = config.num_attention_heads * config.head_dim
    kv = config.num_key_value_heads * config.head_dim
    per_layer = h * (q + 2 * kv) + q * h + 3 * h * inter + 2 * h
    weights = layers * per_layer + config.vocab_size * h + h
    kv_cache = 2 * layers * kv * context_len
    return 2.0 * (weights + kv_cache)


def make_requests(vocab: int, n: int, seed: int) -> list[tuple[list[int], int]]:
    rng = random.Random(seed)
    return [
        ([rng.randrange(3, vocab) for _ in range(rng.randint(100, 1024))], rng.randint(100, 1024)) for _ in range(n)
    ]


def sync_time() -> float:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter()


# ---- slimserve --------------------------------------------------------------------------------------
def slimserve_batch1(llm: LLM, prompt: list[int], new_tokens: int) -> dict:
    engine = llm.engine
    params = SamplingParams(temperature=0.0, max_tokens=new_tokens, ignore_eos=True)
    llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True), use_tqdm=False)
    start = sync_time()
    engine.add_request("b1", prompt, params, stream=False)
    first = None
    while engine.has_unfinished_requests():
        engine.step()
        first = first or sync_time()
    end = sync_time()
    return {"total_s": end - start, "ttft_s": first - start, "decode_tok_s": (new_tokens - 1) / (end - first)}


def greedy_agreement(llm: LLM, folder: str, vocab: int) -> dict:
    """CUDA graphs and multi-step windows must not change greedy output. Compared with an eager engine that
    schedules every step from the host, bf16 rounding differs (other GEMM tilings, other attention splits),
    so on random weights a sequence may take the other branch of a near-tie: where the two outputs first
    differ, the token the fast path chose must be the eager engine's runner-up by a tiny margin."""
    rng = random.Random(2)
    prompts = [[rng.randrange(3, vocab) for _ in range(rng.randint(5, 300))] for _ in range(12)]
    params = SamplingParams(temperature=0.0, max_tokens=64, ignore_eos=True)
    fast = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
    eager = LLM(
        folder, dtype="bfloat16", max_model_len=2048, num_kv_blocks=4096, enforce_eager=True, num_decode_steps=1
    )
    checked = SamplingParams(temperature=0.0, max_tokens=64, ignore_eos=True, logprobs=2)
    slow = [o.outputs[0] for o in eager.generate(prompts, checked, use_tqdm=False)]
    del eager
    identical, near_ties, gaps = 0, 0, []
    for ours, theirs in zip(fast, slow):
        first = next((i for i, (a, b) in enumerate(zip(ours, theirs.token_ids)) if a != b), None)
        if first is None:
            identical += 1
            continue
        top = theirs.logprobs[first]
        if ours[first] in top:
            gap = top[theirs.token_ids[first]] - top[ours[first]]
            gaps.append(gap)
            near_ties += gap < 0.1
    return {"prompts": len(prompts), "identical": identical, "diverged_at_near_tie": near_ties, "tie_gaps": gaps}


def slimserve_throughput(llm: LLM, requests: list[tuple[list[int], int]]) -> dict:
    params = [SamplingParams(temperature=1.0, max_tokens=n, ignore_eos=True) for _, n in requests]
    llm.generate([p for p, _ in requests[:8]], params[:8], use_tqdm=False)  # warm up prefill shapes
    start = sync_time()
    outs = llm.generate([p for p, _ in requests], params, use_tqdm=False)
    elapsed = sync_time() - start
    produced = sum(len(o.outputs[0].token_ids) for o in outs)
    assert produced == sum(n for _, n in requests)
    return {
        "requests": len(requests),
        "elapsed_s": elapsed,
        "output_tokens": produced,
        "output_tok_s": produced / elapsed,
        "preemptions": llm.engine.scheduler.num_preemptions,
    }


# ---- transformers -----------------------------------------------------------------------------------
def hf_batch1(model, prompt: list[int], new_tokens: int, cache: str | None) -> dict:
    ids = torch.tensor([prompt], device=model.device)
    kwargs = dict(do_sample=False, eos_token_id=None, pad_token_id=0, cache_implementation=cache)
    model.generate(ids, max_new_tokens=16, min_new_tokens=16, **kwargs)
    start = sync_time()
    model.generate(ids, max_new_tokens=1, min_new_tokens=1, **kwargs)
    prefill = sync_time() - start
    start = sync_time()
    out = model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, **kwargs)
    total = sync_time() - start
    assert out.shape[1] == len(prompt) + new_tokens
    return {"cache": cache or "dynamic", "total_s": total, "decode_tok_s": (new_tokens - 1) / (total - prefill)}


def hf_throughput(model, requests: list[tuple[list[int], int]], batch_size: int) -> dict:
    ordered = sorted(requests, key=lambda r: len(r[0]))
    produced, start = 0, sync_time()
    for b in range(0, len(ordered), batch_size):
        batch = ordered[b : b + batch_size]
        width = max(len(p) for p, _ in batch)
        ids = torch.zeros(len(batch), width, dtype=torch.long)
        mask = torch.zeros(len(batch), width, dtype=torch.long)
        for i, (p, _) in enumerate(batch):
            ids[i, width - len(p) :] = torch.tensor(p)
            mask[i, width - len(p) :] = 1
        longest = max(n for _, n in batch)
        model.generate(
            ids.to(model.device),
            attention_mask=mask.to(model.device),
            max_new_tokens=longest,
            min_new_tokens=longest,
            do_sample=True,
            temperature=1.0,
            top_p=1.0,
            top_k=0,
            eos_token_id=None,
            pad_token_id=0,
        )
        produced += sum(n for _, n in batch)
    elapsed = sync_time() - start
    return {
        "elapsed_s": elapsed,
        "requests": len(requests),
        "batch_size": batch_size,
        "output_tokens": produced,
        "output_tok_s": produced / elapsed,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=sorted(SHAPES), default="llama-3.2-1b")
    parser.add_argument("--num-requests", type=int, default=256)
    parser.add_argument(
        "--hf-requests",
        type=int,
        default=64,
        help="requests timed through transformers (its rate is measured on these)",
    )
    parser.add_argument("--hf-batch-size", type=int, default=64)
    parser.add_argument("--skip-hf", action="store_true")
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--workdir", default="/tmp/slimserve-bench")
    args = parser.parse_args()

    config = AutoConfig.for_model(**SHAPES[args.model])
    folder = os.path.join(args.workdir, args.model)
    if not os.path.isfile(os.path.join(folder, "config.json")):
        save_random_model(config, folder, dtype=torch.bfloat16, device="cuda", std=0.02)
    prompt = random.Random(1).sample(range(3, config.vocab_size), 128)
    requests = make_requests(config.vocab_size, args.num_requests, seed=0)
    result = {
        "model_shape": args.model,
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "command": " ".join([os.path.basename(sys.executable), *sys.argv]),
        "date": datetime.date.today().isoformat(),
        "dtype": "bfloat16",
    }

    t0 = time.perf_counter()
    llm = LLM(folder, dtype="bfloat16", max_model_len=2048, gpu_memory_utilization=0.6)
    result["slimserve_startup_s"] = time.perf_counter() - t0
    result["kv_cache_tokens"] = llm.engine.runner.num_blocks * llm.engine.config.block_size
    b1 = slimserve_batch1(llm, prompt, 512)
    steps = [decode_bytes_per_step(config, 128 + i) for i in range(1, 512)]
    roofline_tok_s = 511 / (sum(steps) / HBM_BYTES_PER_S)
    b1["roofline_tok_s"] = roofline_tok_s
    b1["roofline_fraction"] = b1["decode_tok_s"] / roofline_tok_s
    result["slimserve_batch1"] = b1
    print(
        f"slimserve batch-1: {b1['decode_tok_s']:.0f} tok/s = {100 * b1['roofline_fraction']:.1f}% of roofline "
        f"({roofline_tok_s:.0f} tok/s)",
        flush=True,
    )
    result["greedy_vs_eager"] = greedy_agreement(llm, folder, config.vocab_size)
    print(f"greedy output, graphs + decode windows vs eager: {result['greedy_vs_eager']}", flush=True)
    result["slimserve_throughput"] = slimserve_throughput(llm, requests)
    print(f"slimserve throughput: {result['slimserve_throughput']['output_tok_s']:.0f} output tok/s", flush=True)
    del llm
    gc.collect()
    torch.cuda.empty_cache()

    if not args.skip_hf:
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16, attn_implementation="sdpa").cuda()
        runs = []
        for cache in (None, "static"):
            try:
                runs.append(hf_batch1(model, prompt, 512, cache))
            except Exception as e:  # a cache implementation that fails here is reported, not fatal
                runs.append({"cache": cache, "error": f"{type(e).__name__}: {e}"[:300]})
            print(f"transformers batch-1: {runs[-1]}", flush=True)
        result["hf_batch1"] = runs
        best = max((r for r in runs if "decode_tok_s" in r), key=lambda r: r["decode_tok_s"])
        result["hf_throughput"] = hf_throughput(model, requests[: args.hf_requests], args.hf_batch_size)
        print(f"transformers throughput: {result['hf_throughput']}", flush=True)
        result["speedup_batch1"] = b1["decode_tok_s"] / best["decode_tok_s"]
        result["speedup_throughput"] = (
            result["slimserve_throughput"]["output_tok_s"] / result["hf_throughput"]["output_tok_s"]
        )

    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"engine-{args.model}-{result['date']}.json")
    with open(path, "w") as f:
        json.dump(result, f, indent=2)
    print("\n| metric | slimserve | transformers | ratio |\n|---|---|---|---|")
    hf_b1 = max((r.get("decode_tok_s", 0) for r in result.get("hf_batch1", [])), default=0)
    hf_tp = result.get("hf_throughput", {}).get("output_tok_s", 0)
    print(
        f"| batch-1 decode tok/s | {b1['decode_tok_s']:.0f} ({100 * b1['roofline_fraction']:.0f}% roofline) "
        f"| {hf_b1:.1f} | {b1['decode_tok_s'] / hf_b1 if hf_b1 else float('nan'):.1f}x |"
    )
    tp = result["slimserve_throughput"]["output_tok_s"]
    print(f"| throughput output tok/s | {tp:.0f} | {hf_tp:.0f} | {tp / hf_tp if hf_tp else float('nan'):.1f}x |")


if __name__ == "__main__":
    main()
