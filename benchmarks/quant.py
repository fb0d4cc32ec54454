"""Quantized inference on a GPU, one run: kernels against their references, then the engine per scheme.

  * kernel checks: every quantized GEMM path (W4A16, W8A16, W2A16, W4A8, block FP8, FP8 activation quantization)
    and paged attention over an FP8 KV cache against the plain-torch references, at real shapes;
  * GEMV timings at the 8B shape's projections (batch 1): each format vs the bf16 cuBLAS GEMV, in GB/s;
  * batch-1 decode (128-token prompt, 256 greedy tokens) for bf16, W8A16, W4A16, W3A16, W2A16, FP8 and W4A8 (and
    W4A16/W8A16 with the output head quantized too: `+lm_head`, or `+W8A16-head`) on the Llama-3.2-1B and an 8B-class
    (Llama-3.1-8B) shape: tok/s, ratio to bf16, and the fraction of the HBM roofline of the bytes each step
    actually reads (quantized weights, scales, zero points, the LM head and the KV cache of the context) at
    3.0 TB/s;
  * prefill throughput of a 4096-token prompt (8B shape), each scheme vs bf16;
  * offline throughput (256 requests, input and output lengths uniform in 100-1024), each scheme and shape;
  * FP8 KV cache (8B shape, bf16 weights): KV-cache tokens that fit in the same memory, and decode speed
    at a 32K-token context vs the bf16 cache.
Random weights (load_format="dummy") of the real shapes: speed does not depend on the values.

usage: python benchmarks/quant.py [--parts checks gemv decode prefill throughput kv] [--shapes ...] [--schemes ...]
                                  [--num-requests 256] [--gemv-configs results/quant-gemv-DATE.json]
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
import triton
from transformers import AutoConfig

from slimserve import LLM, SamplingParams
from slimserve.checkpoint.random_model import word_level_tokenizer
from slimserve.compress import preset
from slimserve.kernels.attention import paged_attention_triton
from slimserve.kernels.attention_ref import paged_attention_ref
from slimserve.kernels.fp8_quant import quantize_fp8_triton
from slimserve.kernels.fp8_quant_ref import quantize_fp8_ref
from slimserve.kernels.quant_gemm import GEMV_CONFIGS, GemvConfig, quant_gemm_triton
from slimserve.kernels.quant_gemm_ref import QuantWeight, pack_codes, quant_gemm_ref
from slimserve.layers.linear import Linear
from slimserve.layers.quantized import QuantLinearBase

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from engine import SHAPES, make_requests, slimserve_throughput, sync_time  # noqa: E402

HBM_BYTES_PER_S = 3.0e12
BF16_FLOPS = 790e12
SCHEMES = ["bf16", "W8A16", "W4A16", "W3A16", "W2A16", "FP8", "W4A8", "W4A16+lm_head", "W4A16+W8A16-head",
           "W8A16+lm_head"]  # fmt: skip
# BODY+lm_head: the output head quantized like the body; BODY+HEAD-head: the head in the preset HEAD (a second
# config group that names lm_head); otherwise the head stays bf16.
# checks: kernels vs references; gemv: batch-1 GEMV timings; decode: batch-1 engine decode per shape and scheme
# (always run with prefill/throughput); prefill: 4096-token prefill (8B); throughput: offline; kv: FP8 cache.
PARTS = ["checks", "gemv", "decode", "prefill", "throughput", "kv"]


def quantization_config(scheme: str) -> dict | None:
    """config.json's quantization_config as slimserve's compressor writes it, for the schemes above."""
    if scheme == "bf16":
        return None
    body, _, head = scheme.partition("+")

    def group(name: str, targets: list[str]) -> dict:
        config = preset(name)
        a = config.input_args()
        return {"targets": targets, "weights": config.weight_args().to_dict(),
                "input_activations": None if a is None else a.to_dict(), "format": config.format}  # fmt: skip

    groups = {"group_0": group(body, ["Linear"])}
    if head.endswith("-head"):
        groups["group_1"] = group(head.removesuffix("-head"), ["lm_head"])
    return {"quant_method": "compressed-tensors", "format": groups["group_0"]["format"],
            "quantization_status": "compressed", "config_groups": groups, "kv_cache_scheme": None,
            "ignore": [] if head else ["lm_head"]}  # fmt: skip


def model_folder(workdir: str, shape: str, scheme: str) -> str:
    folder = os.path.join(workdir, f"{shape}-{scheme}")
    os.makedirs(folder, exist_ok=True)
    cfg = AutoConfig.for_model(**SHAPES[shape]).to_dict()
    cfg["architectures"] = ["LlamaForCausalLM"]
    q = quantization_config(scheme)
    if q is not None:
        cfg["quantization_config"] = q
    if "+" in scheme:
        cfg["tie_word_embeddings"] = False  # as the compressor writes a quantized head: untied from the embedding
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(cfg, f)
    word_level_tokenizer(cfg["vocab_size"]).save_pretrained(folder)
    return folder


def free() -> None:
    """Return a finished engine's memory to the device (the caller drops its reference first)."""
    gc.collect()
    torch.cuda.empty_cache()


# ---- kernel checks -------------------------------------------------------------------------------------
def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def random_int_weight(n: int, k: int, bits: int, group: int, zeros: bool) -> QuantWeight:
    codes = torch.randint(0, 1 << bits, (n, k), device="cuda")
    scales = (torch.rand(n, k // group, device="cuda") * 2e-3 + 1e-3).bfloat16()
    z = torch.randint(0, 1 << bits, (n, k // group), device="cuda").bfloat16() if zeros else None
    return QuantWeight(pack_codes(codes, bits), scales, z, bits, group, k, n).input_major()  # as the layers hold it


def kernel_checks() -> list[dict]:
    rows = []
    for m, n, k in [(1, 6144, 4096), (4, 4096, 14336), (7, 4096, 14336), (16, 28672, 4096), (300, 4096, 4096),
                    (2048, 6144, 4096)]:  # fmt: skip
        x = torch.randn(m, k, device="cuda").bfloat16()
        for name, bits, group, zeros in [("W4A16", 4, 128, False), ("W4A16-asym-g32", 4, 32, True),
                                         ("W8A16-g64", 8, 64, False), ("W2A16-asym-g64", 2, 64, True)]:  # fmt: skip
            w = random_int_weight(n, k, bits, group, zeros)
            rows.append({"kernel": name, "shape": [m, n, k],
                         "rel_err": rel_err(quant_gemm_triton(x, w), quant_gemm_ref(x, w))})  # fmt: skip
        xq, xs = quantize_fp8_triton(x)
        rq, rs = quantize_fp8_ref(x)
        rows.append(
            {"kernel": "fp8-quant-token", "shape": [m, k], "rel_err": rel_err(xq.float() * xs, rq.float() * rs)}
        )
        w = random_int_weight(n, k, 4, 128, False)
        rows.append({"kernel": "W4A8", "shape": [m, n, k],
                     "rel_err": rel_err(quant_gemm_triton(xq, w, xs), quant_gemm_ref(xq, w, xs))})  # fmt: skip
        wq = (torch.randn(n, k, device="cuda") * 64).to(torch.float8_e4m3fn)
        bw = QuantWeight(wq, torch.rand(n, k // 128, device="cuda") * 1e-4, None, 8, 128, k, n)
        gq, gs = quantize_fp8_triton(x, 128)
        rows.append({"kernel": "FP8-block", "shape": [m, n, k],
                     "rel_err": rel_err(quant_gemm_triton(gq, bw, gs), quant_gemm_ref(gq, bw, gs))})  # fmt: skip
    # Paged attention over an FP8 cache (decode, 4 sequences up to 4K tokens, 8B heads).
    num_blocks, bs, kvh, hd = 1100, 16, 8, 128
    k_cache = (torch.randn(num_blocks, bs, kvh, hd, device="cuda") * 20).to(torch.float8_e4m3fn)
    v_cache = (torch.randn(num_blocks, bs, kvh, hd, device="cuda") * 20).to(torch.float8_e4m3fn)
    ks, vs = torch.rand(kvh, device="cuda") * 0.05, torch.rand(kvh, device="cuda") * 0.05
    lens = torch.tensor([4000, 1, 777, 2500], dtype=torch.int32, device="cuda")
    tables = torch.randperm(num_blocks, device="cuda")[: 4 * 256].view(4, 256).int()
    cu = torch.arange(5, dtype=torch.int32, device="cuda")
    q = torch.randn(4, 32, hd, device="cuda").bfloat16()
    args = (q, k_cache, v_cache, cu, lens, tables, hd**-0.5)
    out = paged_attention_triton(*args, 1, k_scale=ks, v_scale=vs)
    rows.append({"kernel": "attention-fp8-kv", "shape": [4, 32, hd],
                 "rel_err": rel_err(out, paged_attention_ref(*args, ks, vs))})  # fmt: skip
    return rows


# ---- GEMV timings --------------------------------------------------------------------------------------
def gemv_timings() -> list[dict]:
    """Batch-1 GEMV of each 8B projection: microseconds and GB/s of the bytes read (weights + scales)."""
    rows = []
    for name, n, k in [("qkv", 6144, 4096), ("o", 4096, 4096), ("gate_up", 28672, 4096), ("down", 4096, 14336)]:
        x = torch.randn(1, k, device="cuda").bfloat16()
        dense = torch.randn(n, k, device="cuda").bfloat16() * 0.02
        cases = {"bf16": (lambda x=x, dense=dense: torch.nn.functional.linear(x, dense), n * k * 2)}
        for scheme, bits, group, zeros in (("W8A16", 8, 128, False), ("W4A16", 4, 128, False), ("W2A16", 2, 64, True)):
            w = random_int_weight(n, k, bits, group, zeros)
            nbytes = w.qweight.nbytes + w.scales.nbytes + (0 if w.zeros is None else w.zeros.nbytes)
            cases[scheme] = ((lambda x=x, w=w: quant_gemm_triton(x, w)), nbytes)
        wq = (torch.randn(n, k, device="cuda") * 64).to(torch.float8_e4m3fn)
        sb = torch.rand(1, n, device="cuda")

        def fp8(x=x, wq=wq, sb=sb):
            xq, xs = quantize_fp8_triton(x)
            return torch._scaled_mm(xq, wq.t(), scale_a=xs, scale_b=sb, out_dtype=torch.bfloat16)

        cases["FP8"] = (fp8, n * k + n * 4)
        w4 = random_int_weight(n, k, 4, 128, False)

        def w4a8(x=x, w4=w4):
            xq, xs = quantize_fp8_triton(x)
            return quant_gemm_triton(xq, w4, xs)

        cases["W4A8"] = (w4a8, w4.qweight.nbytes + w4.scales.nbytes)
        for scheme, (fn, nbytes) in cases.items():
            us = triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median") * 1e3
            rows.append({"proj": name, "scheme": scheme, "us": us, "GB_s": nbytes / us / 1e3})
    return rows


# ---- engine --------------------------------------------------------------------------------------------
def step_bytes(llm: LLM, context: int) -> float:
    """Bytes one batch-1 decode step reads: every linear layer's stored tensors, the LM head, the norms and the
    KV cache of `context` tokens."""
    model = llm.engine.runner.model
    total = 0 if model.lm_head is None else model.lm_head.nbytes  # a quantized head counts as a linear below
    for module in model.modules():
        if isinstance(module, QuantLinearBase):
            w = module.qweight
            total += w.qweight.nbytes + w.scales.nbytes + (0 if w.zeros is None else w.zeros.nbytes)
        elif isinstance(module, Linear):
            total += module.weight.nbytes
        if getattr(module, "bias", None) is not None:
            total += module.bias.nbytes
    total += sum(p.nbytes for n, p in model.named_parameters() if n.endswith("norm.weight"))
    cfg = llm.engine.model_config
    kv_itemsize = llm.engine.runner.kv_dtype.itemsize
    return total + 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim * context * kv_itemsize


def batch1_decode(llm: LLM, vocab: int, prompt_len: int, new_tokens: int) -> dict:
    engine = llm.engine
    prompt = random.Random(1).sample(range(3, vocab), prompt_len)
    params = SamplingParams(temperature=0.0, max_tokens=new_tokens, ignore_eos=True)
    llm.generate([prompt[:64]], SamplingParams(temperature=0.0, max_tokens=32, ignore_eos=True), use_tqdm=False)
    start = sync_time()
    engine.add_request("b1", prompt, params, stream=False)
    first = None
    while engine.has_unfinished_requests():
        engine.step()
        first = first or sync_time()
    end = sync_time()
    tok_s = (new_tokens - 1) / (end - first)
    mean_bytes = step_bytes(llm, prompt_len + new_tokens // 2)
    roofline = HBM_BYTES_PER_S / mean_bytes
    return {"decode_tok_s": tok_s, "bytes_per_step": mean_bytes, "roofline_tok_s": roofline,
            "roofline_fraction": tok_s / roofline, "ttft_s": first - start}  # fmt: skip


def prefill(llm: LLM, vocab: int, tokens: int, repeats: int = 3) -> dict:
    rng = random.Random(3)
    params = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True)
    times = []
    for _ in range(repeats + 1):
        prompt = [rng.randrange(3, vocab) for _ in range(tokens)]  # fresh: no prefix-cache hit
        start = sync_time()
        llm.generate([prompt], params, use_tqdm=False)
        times.append(sync_time() - start)
    best = sorted(times[1:])[len(times[1:]) // 2]
    return {"tokens": tokens, "median_s": best, "tok_s": tokens / best}


def throughput(llm: LLM, vocab: int, n: int) -> dict:
    return slimserve_throughput(llm, make_requests(vocab, n, seed=0))


def long_context_decode(llm: LLM, vocab: int, context: int, new_tokens: int) -> dict:
    rng = random.Random(5)
    prompt = [rng.randrange(3, vocab) for _ in range(context)]
    engine = llm.engine
    engine.add_request("long", prompt, SamplingParams(temperature=0.0, max_tokens=new_tokens, ignore_eos=True),
                       stream=False)  # fmt: skip
    first = None
    while engine.has_unfinished_requests():
        outputs = engine.step()
        if first is None and outputs:  # the prompt's last chunk is prefilled: decoding starts here
            first = sync_time()
    end = sync_time()
    tok_s = (new_tokens - 1) / (end - first)
    roofline = HBM_BYTES_PER_S / step_bytes(llm, context + new_tokens // 2)
    return {"context": context, "decode_tok_s": tok_s, "roofline_fraction": tok_s / roofline}


def kv_cache_comparison(workdir: str, t0: float) -> dict:
    """FP8 KV cache: same weights and memory budget as the bf16 cache; decode at a 32K context."""
    shape, vocab = "llama-3.1-8b", SHAPES["llama-3.1-8b"]["vocab_size"]
    folder = model_folder(workdir, shape, "bf16")
    result = {}
    for kv in ("auto", "fp8"):
        llm = LLM(folder, dtype="bfloat16", load_format="dummy", enable_prefix_caching=False, max_num_seqs=1,
                  max_model_len=32768 + 256, gpu_memory_utilization=0.85, kv_cache_dtype=kv)  # fmt: skip
        r = {"kv_cache_tokens": llm.engine.runner.num_blocks * llm.engine.config.block_size}
        r.update(long_context_decode(llm, vocab, 32768, 128))
        result[kv] = r
        print(f"[{time.perf_counter() - t0:.0f}s] kv {kv}: {r}", flush=True)
        del llm
        free()
    result["tokens_ratio"] = result["fp8"]["kv_cache_tokens"] / result["auto"]["kv_cache_tokens"]
    result["decode_32k_speedup"] = result["fp8"]["decode_tok_s"] / result["auto"]["decode_tok_s"]
    return result


def load_gemv_configs(path: str) -> None:
    """Run the engine with the GEMV launch table of a benchmarks/quant_gemv.py sweep instead of the built-in one
    (its W4A8 entries aside: the table is keyed by bits, group size and shape, and the A16 sweeps fill it)."""
    with open(path) as f:
        sweep = json.load(f)["configs"]
    for fmt, table in sweep.items():
        if fmt == "W4A8":
            continue
        for key, cfg in table.items():
            GEMV_CONFIGS[tuple(int(v) for v in key.split(","))] = GemvConfig(**cfg)


def engine_section(args: argparse.Namespace, result: dict, save, t0: float) -> None:
    result["engine"] = {}
    for shape in args.shapes:
        vocab = SHAPES[shape]["vocab_size"]
        big = shape == "llama-3.1-8b"
        per_scheme = result["engine"][shape] = {}
        for scheme in args.schemes:
            folder = model_folder(args.workdir, shape, scheme)
            kwargs = dict(dtype="bfloat16", load_format="dummy", enable_prefix_caching=False)
            if big:  # one sequence at a time unless the throughput runs on this shape too
                kwargs.update(max_model_len=4096 + 256, gpu_memory_utilization=0.85)
                if "throughput" not in args.parts:
                    kwargs.update(max_num_seqs=1)
            else:
                kwargs.update(max_model_len=2048, gpu_memory_utilization=0.6)
            llm = LLM(folder, **kwargs)
            r = per_scheme[scheme] = {"batch1": batch1_decode(llm, vocab, 128, 256)}
            if big and "prefill" in args.parts:
                r["prefill_4096"] = prefill(llm, vocab, 4096)
            if "throughput" in args.parts:
                r["throughput"] = throughput(llm, vocab, args.num_requests)
            print(f"[{time.perf_counter() - t0:.0f}s] {shape} {scheme}: {json.dumps(r)}", flush=True)
            save()
            del llm
            free()
        base = per_scheme.get("bf16")
        for r in per_scheme.values() if base else ():
            r["batch1"]["speedup_vs_bf16"] = r["batch1"]["decode_tok_s"] / base["batch1"]["decode_tok_s"]
            if "prefill_4096" in r:
                r["prefill_4096"]["speedup_vs_bf16"] = r["prefill_4096"]["tok_s"] / base["prefill_4096"]["tok_s"]
            if "throughput" in r:
                r["throughput"]["speedup_vs_bf16"] = (
                    r["throughput"]["output_tok_s"] / base["throughput"]["output_tok_s"]
                )
        save()


def print_engine_table(result: dict) -> None:
    print("| shape | scheme | batch-1 tok/s | vs bf16 | roofline | prefill 4096 tok/s | vs bf16 | throughput tok/s "
          "| vs bf16 |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|")
    for shape, per_scheme in result["engine"].items():
        for scheme, r in per_scheme.items():
            b1, pf, tp = r["batch1"], r.get("prefill_4096"), r.get("throughput")
            ratio = f"{b1['speedup_vs_bf16']:.2f}x" if "speedup_vs_bf16" in b1 else "-"
            cells = [shape, scheme, f"{b1['decode_tok_s']:.0f}", ratio, f"{100 * b1['roofline_fraction']:.0f}%",
                     f"{pf['tok_s']:.0f}" if pf else "-", f"{pf['speedup_vs_bf16']:.2f}x" if pf else "-",
                     f"{tp['output_tok_s']:.0f}" if tp else "-",
                     f"{tp['speedup_vs_bf16']:.2f}x" if tp else "-"]  # fmt: skip
            print("| " + " | ".join(cells) + " |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", nargs="+", choices=PARTS, default=PARTS)
    parser.add_argument("--shapes", nargs="+", choices=["llama-3.1-8b", "llama-3.2-1b"],
                        default=["llama-3.1-8b", "llama-3.2-1b"])  # fmt: skip
    parser.add_argument("--schemes", nargs="+", choices=SCHEMES, default=SCHEMES)
    parser.add_argument("--gemv-configs", help="GEMV launch table from a benchmarks/quant_gemv.py JSON")
    parser.add_argument("--num-requests", type=int, default=256)
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--workdir", default="/tmp/slimserve-quant-bench")
    args = parser.parse_args()
    if args.gemv_configs:
        load_gemv_configs(args.gemv_configs)
    result: dict = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "command": " ".join([os.path.basename(sys.executable), *sys.argv]),
        "date": datetime.date.today().isoformat(),
    }
    t0 = time.perf_counter()
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"quant-{result['date']}.json")

    def save() -> None:  # after every section: a run cut short keeps what it measured
        with open(path, "w") as f:
            json.dump(result, f, indent=2)

    if "checks" in args.parts:
        result["kernel_checks"] = kernel_checks()
        for r in result["kernel_checks"]:
            print(f"check {r['kernel']:>18} {str(r['shape']):>22}  rel_err {r['rel_err']:.2e}", flush=True)
    if "gemv" in args.parts:
        result["gemv"] = gemv_timings()
        for r in result["gemv"]:
            print(f"gemv {r['proj']:>8} {r['scheme']:>22} {r['us']:8.1f} us {r['GB_s']:7.0f} GB/s", flush=True)
    print(f"[{time.perf_counter() - t0:.0f}s] kernels done", flush=True)
    save()
    if {"decode", "prefill", "throughput"} & set(args.parts):
        engine_section(args, result, save, t0)
    if "kv" in args.parts:
        result["kv_cache"] = kv_cache_comparison(args.workdir, t0)
        save()

    print(f"\nwrote {path}\n")
    if "engine" in result:
        print_engine_table(result)
    if "kv_cache" in result:
        kv = result["kv_cache"]
        print(f"\nKV cache (8B, bf16 weights): fp8 holds {kv['tokens_ratio']:.2f}x the tokens of bf16; decode at 32K: "
              f"bf16 KV {kv['auto']['decode_tok_s']:.1f} tok/s, fp8 KV {kv['fp8']['decode_tok_s']:.1f} tok/s "
              f"({kv['decode_32k_speedup']:.2f}x)")  # fmt: skip
    checks = result.get("kernel_checks", [])
    bad = [r for r in checks if not r["rel_err"] < 2e-2]
    print(f"kernel checks: {len(checks) - len(bad)}/{len(checks)} within 2e-2")


if __name__ == "__main__":
    main()
