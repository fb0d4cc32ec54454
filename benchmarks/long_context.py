"""Long context on one GPU: a 256K-token prompt prefilled in chunks, then greedy decoding at that length.

The Llama-3.2-1B shape (GQA, 8 KV heads of 64; random bf16 weights) with max_position_embeddings raised
so that the prompt fits (its llama3 rope scaling as in the checkpoint). Reports the KV-cache plan, peak
GPU memory, prefill time and tok/s (with the fraction of the bf16 matrix peak: linear layers plus causal
attention FLOPs), and decode tok/s at 256K (with the fraction of the HBM roofline: weights plus the KV
cache read per step). It also times batch-1 decode at short context as benchmarks/engine.py does, through
the tensor-parallel code path with tensor_parallel_size=1, to show that path costs nothing.

usage: python benchmarks/long_context.py [--prompt-len 262144] [--new-tokens 128]
       python benchmarks/long_context.py --shape tiny --device cpu --prompt-len 2048   (a quick check)
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import random
import sys
import tempfile
import time

import torch
from transformers import AutoConfig

from slimserve import LLM, SamplingParams
from slimserve.checkpoint.random_model import save_random_model
from slimserve.config import EngineConfig

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from engine import SHAPES, decode_bytes_per_step, slimserve_batch1  # noqa: E402

HBM_BYTES_PER_S = 3.0e12
BF16_FLOPS_PER_S = 790e12
TINY = dict(
    SHAPES["llama-3.2-1b"],
    vocab_size=1024,
    hidden_size=128,
    intermediate_size=256,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=32,
)


def sync_time(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter()


def prefill_flops(config, n: int) -> float:
    """Linear layers over n tokens (the LM head once) plus causal attention (QK^T and PV)."""
    h, inter, layers = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    q = config.num_attention_heads * config.head_dim
    kv = config.num_key_value_heads * config.head_dim
    linear = 2 * n * layers * (h * (q + 2 * kv) + q * h + 3 * h * inter) + 2 * h * config.vocab_size
    attention = 2 * 2 * layers * q * n * (n + 1) / 2
    return linear + attention


def tp_kwargs() -> dict:
    """tensor_parallel_size=1 where the engine has the option (it also runs against engines without it)."""
    return {"tensor_parallel_size": 1} if "tensor_parallel_size" in EngineConfig.__dataclass_fields__ else {}


def long_prompt_run(llm: LLM, config, prompt_len: int, new_tokens: int, device: torch.device) -> dict:
    engine = llm.engine
    prompt = [random.Random(0).randrange(3, config.vocab_size) for _ in range(prompt_len)]
    if device.type == "cuda":
        gc.collect()
        torch.cuda.reset_peak_memory_stats()
        resident = torch.cuda.memory_allocated()
    engine.add_request("long", prompt, SamplingParams(temperature=0.0, max_tokens=new_tokens, ignore_eos=True))
    start = sync_time(device)
    first = None
    steps = 0
    while engine.has_unfinished_requests():
        outputs = engine.step()
        steps += 1
        if first is None and outputs:
            first = sync_time(device)
    end = sync_time(device)
    prefill_s = first - start
    kv_bytes = 2 * 2 * config.num_hidden_layers * config.num_key_value_heads * config.head_dim
    decode_bytes = sum(decode_bytes_per_step(config, prompt_len + i) for i in range(1, new_tokens))
    result = {
        "prompt_tokens": prompt_len,
        "new_tokens": new_tokens,
        "prefill_chunk_tokens": engine.config.max_num_batched_tokens,
        "engine_steps": steps,
        "prefill_s": prefill_s,
        "prefill_tok_s": prompt_len / prefill_s,
        "prefill_flops": prefill_flops(config, prompt_len),
        "decode_s": end - first,
        "decode_tok_s": (new_tokens - 1) / (end - first),
        "kv_cache_gib_at_full_length": kv_bytes * (prompt_len + new_tokens) / 2**30,
    }
    result["prefill_fraction_of_bf16_peak"] = result["prefill_flops"] / prefill_s / BF16_FLOPS_PER_S
    result["decode_roofline_tok_s"] = (new_tokens - 1) / (decode_bytes / HBM_BYTES_PER_S)
    result["decode_fraction_of_roofline"] = result["decode_tok_s"] / result["decode_roofline_tok_s"]
    if device.type == "cuda":
        result["resident_gib"] = resident / 2**30  # weights + KV cache, allocated at start
        result["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
        result["peak_reserved_gib"] = torch.cuda.max_memory_reserved() / 2**30
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=["llama-3.2-1b", "tiny"], default="llama-3.2-1b")
    parser.add_argument("--prompt-len", type=int, default=262144)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--chunk", type=int, default=8192, help="max_num_batched_tokens (the prefill chunk)")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--skip-long", action="store_true", help="only the short-context batch-1 decode")
    parser.add_argument("--skip-batch1", action="store_true")
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--workdir", default=tempfile.gettempdir())
    args = parser.parse_args()

    device = torch.device(args.device)
    dtype = "bfloat16" if device.type == "cuda" else "float32"
    total = args.prompt_len + args.new_tokens
    fields = dict(SHAPES[args.shape] if args.shape != "tiny" else TINY)
    fields["max_position_embeddings"] = max(fields["max_position_embeddings"], total)
    config = AutoConfig.for_model(**fields)
    folder = os.path.join(args.workdir, f"slimserve-long-{args.shape}-{fields['max_position_embeddings']}")
    if not os.path.isfile(os.path.join(folder, "config.json")):
        save_random_model(config, folder, dtype=getattr(torch, dtype), device=args.device, std=0.02)
    result = {
        "model_shape": args.shape,
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "command": " ".join([os.path.basename(sys.executable), *sys.argv]),
        "date": datetime.date.today().isoformat(),
        "dtype": dtype,
        "max_position_embeddings": fields["max_position_embeddings"],
        "tp_code_path": bool(tp_kwargs()),
    }
    if not args.skip_long:
        block_size = 16
        llm = LLM(
            folder,
            dtype=dtype,
            device=args.device,
            max_model_len=total,
            max_num_seqs=4,
            max_num_batched_tokens=args.chunk,
            enable_prefix_caching=False,
            block_size=block_size,
            num_kv_blocks=-(-total // block_size),  # exactly the context: peak memory is what 256K needs
            **tp_kwargs(),
        )
        result["kv_cache_plan"] = getattr(llm.engine, "kv_cache_plan", "")
        print(result["kv_cache_plan"], flush=True)
        result["long"] = long_prompt_run(llm, config, args.prompt_len, args.new_tokens, device)
        print(json.dumps(result["long"], indent=1), flush=True)
        del llm
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    if not args.skip_batch1:
        # As benchmarks/engine.py: 128-token prompt, 512 greedy tokens.
        llm = LLM(
            folder, dtype=dtype, device=args.device, max_model_len=2048, gpu_memory_utilization=0.6, **tp_kwargs()
        )
        prompt = random.Random(1).sample(range(3, config.vocab_size), 128)
        b1 = slimserve_batch1(llm, prompt, 512) if device.type == "cuda" else {}
        if device.type != "cuda":  # engine.py's timer synchronises CUDA; on the CPU only check that it runs
            llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True), use_tqdm=False)
        result["batch1_short"] = b1
        print(f"batch-1 decode (128 in / 512 out): {b1}", flush=True)

    os.makedirs(args.out, exist_ok=True)
    name = "long-context" if not args.skip_long else "batch1"
    path = os.path.join(args.out, f"{name}-{args.shape}-{result['date']}.json")
    with open(path + ".tmp", "w") as f:
        json.dump(result, f, indent=2)
    os.replace(path + ".tmp", path)
    if "long" in result:
        r = result["long"]
        print("\n| prompt | peak GPU memory | prefill | prefill tok/s | decode tok/s at that length |")
        print("|---|---|---|---|---|")
        peak = f"{r['peak_gib']:.1f} GiB" if "peak_gib" in r else "n/a"
        print(
            f"| {r['prompt_tokens']} | {peak} | {r['prefill_s']:.1f} s "
            f"({100 * r['prefill_fraction_of_bf16_peak']:.0f}% of bf16 peak) | {r['prefill_tok_s']:.0f} "
            f"| {r['decode_tok_s']:.0f} ({100 * r['decode_fraction_of_roofline']:.0f}% of roofline) |"
        )
    print(f"results: {path}")


if __name__ == "__main__":
    main()
