"""Pruning on real weights: quality of unstructured and 2:4 sparsity (magnitude, Wanda, SparseGPT), of a
structured-pruned and of a GQA-converted model before and after distillation, and the GPU speed of 2:4 layers
and of the pruned model.

Parts (run any subset; each writes benchmarks/results/pruning-<part>-<model>.json and prints a table):
  sparsity    dense vs 50% unstructured vs 2:4 for each method (CPU is enough)
  structured  Minitron-style width pruning to --target-fraction of the parameters, then distillation; MHA/GQA
              to fewer KV heads (mean-pooled), then distillation (GPU: bf16 autocast)
  speed       (GPU; sections chosen by --speed) linears: 2:4 linear layers through cuSPARSELt and CUTLASS vs dense
              at Llama-3-8B shapes; prefill: a Llama-3-8B-shaped decoder stack, dense vs 2:4; engine24: the engine
              with --sparse-kernels vs dense GEMMs on a 2:4 Llama-3.2-1B-shaped checkpoint (random weights);
              pruned: the engine on the pruned students vs the original

usage: python benchmarks/pruning.py --model ~/.cache/real-models/SmolLM2-135M-Instruct.Q4_1.gguf --parts sparsity
       python benchmarks/pruning.py --model SmolLM2.gguf --parts structured speed --distill-seconds 120
"""

from __future__ import annotations

import argparse
import copy
import datetime
import gc
import json
import os
import platform
import sys
import tempfile
import time
import traceback

import torch

from slimserve.compress import Calibration
from slimserve.compress.configs import preset
from slimserve.compress.corpus import generic_samples
from slimserve.compress.loading import load_causal_lm
from slimserve.compress.prune import SparsityConfig, prune_
from slimserve.compress.prune.gqa import convert_gqa
from slimserve.compress.prune.importance import estimate_importance
from slimserve.compress.prune.rebuild import count_parameters, save_folder
from slimserve.compress.prune.structured import apply_structured, shape_for_target
from slimserve.distill import DistillConfig, distill
from slimserve.eval.metrics import Quality, compare, windows
from slimserve.eval.text import heldout_text

REFERENCE_NOTE = (
    "The reference is the dequantized 4-bit GGUF model (fp32 weights on a 4-bit grid); all deltas are against it."
)
# Published anchors: WikiText-2 perplexity of Llama-2-7B from the Wanda authors' repository README (Sun et al.,
# 2023; 128 C4 calibration sequences of 2048 tokens), and Minitron's claims (Muralidharan et al., 2024).
PUBLISHED = {
    "Llama-2-7B, WikiText-2 (Wanda)": {
        "dense": 5.12,
        "magnitude 50%": 14.89,
        "sparsegpt 50%": 6.51,
        "wanda 50%": 6.42,
        "magnitude 2:4": 54.59,
        "sparsegpt 2:4": 10.17,
        "wanda 2:4": 11.02,
    },
    "Minitron": "8B and 4B from Nemotron-4 15B (embedding, heads and MLP width pruned, then distilled) with up to 40x "
    "fewer training tokens than training from scratch and up to 16% better MMLU than training from scratch",
}
SPARSITY_VARIANTS = [
    ("magnitude 50%", SparsityConfig("magnitude")),
    ("wanda 50%", SparsityConfig("wanda")),
    ("sparsegpt 50%", SparsityConfig("sparsegpt")),
    ("magnitude 2:4", SparsityConfig("magnitude", structure="2:4")),
    ("wanda 2:4", SparsityConfig("wanda", structure="2:4")),
    ("sparsegpt 2:4", SparsityConfig("sparsegpt", structure="2:4")),
    (
        "sparsegpt 2:4 + W8A16 (joint)",
        SparsityConfig("sparsegpt", structure="2:4", quant=preset("W8A16", group_size=None)),
    ),
]


def device_name(device: torch.device) -> str:
    return "cpu" if device.type == "cpu" else torch.cuda.get_device_name(device)


def header(args, device: torch.device, part: str) -> dict:
    return {
        "part": part,
        "model": args.model,
        "command": " ".join([sys.executable, *sys.argv]),
        "device": device_name(device),
        "host": platform.node(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
        "torch": torch.__version__,
        "note": REFERENCE_NOTE,
    }


def write(args, part: str, data: dict) -> None:
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"pruning-{part}-{args.name}.json")
    with open(path, "w") as f:
        json.dump(data, f, indent=2)
    print(f"wrote {path}")


def quality_row(name: str, q: Quality, extra: str = "") -> str:
    kl = "-" if q.kl_divergence is None else f"{q.kl_divergence:.4f}"
    top1 = "-" if q.top1_agreement is None else f"{q.top1_agreement:.2%}"
    return f"| {name} | {extra} | {q.perplexity:.3f} | {kl} | {top1} |"


def part_sparsity(args, reference, tokenizer, wins, calib: Calibration, device: torch.device) -> None:
    """Every variant is pruned first, then all are evaluated in one pass (the reference's logits once per window).
    Magnitude pruning gets no calibration data: it needs none."""
    out = header(args, device, "sparsity") | {"published": PUBLISHED, "variants": {}}
    out["calibration"] = calib.describe()
    models = {}
    for label, config in SPARSITY_VARIANTS:
        model = copy.deepcopy(reference)
        start = time.perf_counter()
        data = calib if config.needs_calibration else None
        report = prune_(model, config, data, device=device, progress=False)
        out["variants"][label] = {
            "scheme": config.describe(),
            "seconds": time.perf_counter() - start,
            "zeros": report.scheme["global_sparsity"],
        }
        models[label] = model.to(device)
        print(label, f"pruned in {out['variants'][label]['seconds']:.1f}s", flush=True)
    quality = compare(reference.to(device), models, wins, progress=False)
    out["dense"] = quality["reference"].to_dict()
    lines = ["| model | zeros | perplexity | KL (nats/token) | top-1 agreement |", "|---|---:|---:|---:|---:|"]
    lines.append(quality_row("dense", quality["reference"], "0%"))
    for label in models:
        out["variants"][label].update(quality[label].to_dict())
        lines.append(quality_row(label, quality[label], f"{out['variants'][label]['zeros']:.1%}"))
    out["windows"], out["context"] = len(wins), args.context
    write(args, "sparsity", out)
    print("\n".join(lines))


def distill_student(args, teacher, student, data, label: str, seconds: float, run_dir: str) -> dict:
    config = DistillConfig(
        steps=args.distill_steps,
        batch_size=args.batch_size,
        lr=args.lr,
        warmup_steps=20,
        save_every=0,
        max_seconds=seconds,
    )
    result = distill(teacher, student, data, config, os.path.join(run_dir, label))
    return {
        "steps": result.steps,
        "seconds": result.seconds,
        "tokens": result.tokens,
        "first_loss": result.losses[0],
        "last_loss": sum(result.losses[-10:]) / len(result.losses[-10:]),
        "config": config.to_dict(),
    }


def part_structured(args, reference, tokenizer, wins, calib: Calibration, device: torch.device, run_dir: str) -> dict:
    """Returns the student folders for the speed part."""
    out = header(args, device, "structured")
    teacher = reference.to(device)
    data = torch.cat(generic_samples(tokenizer, args.distill_rows, args.seq_len, seed=1), dim=0)
    out["distill_data"] = {"source": "generic", "rows": data.shape[0], "seq_len": data.shape[1]}
    total = count_parameters(reference)
    importance = estimate_importance(teacher, calib.samples, device, progress=False)
    shape = shape_for_target(reference, int(total * args.target_fraction))
    students = {}
    if "structured" in args.students:
        students["structured"] = apply_structured(reference.cpu(), importance, shape)
    if "gqa" in args.students:
        students["gqa"] = convert_gqa(reference.cpu(), args.kv_heads)
    teacher = reference.to(device)
    folders = {}
    lines = ["| model | params | perplexity | KL (nats/token) | top-1 agreement |", "|---|---:|---:|---:|---:|"]
    for label, student in students.items():
        student = student.float().to(device)
        before = compare(teacher, {"before": student}, wins, progress=False)
        if "reference" not in out:
            out["reference"] = before["reference"].to_dict() | {"parameters": total}
            lines.append(quality_row("dense reference", before["reference"], f"{total / 1e6:.1f}M"))
        share = args.structured_share if label == "structured" else 1 - args.structured_share
        seconds = args.distill_seconds * (share if len(students) > 1 else 1.0)
        run = distill_student(args, teacher, student, data, label, seconds, run_dir)
        after = compare(teacher, {"after": student}, wins, progress=False)
        params = count_parameters(student)
        b, a, ref = before["before"], after["after"], before["reference"].perplexity
        lost = b.perplexity - ref
        out[label] = {
            "parameters": params,
            "config": {
                k: getattr(student.config, k)
                for k in (
                    "hidden_size",
                    "intermediate_size",
                    "num_attention_heads",
                    "num_key_value_heads",
                    "num_hidden_layers",
                )
            },  # fmt: skip
            "before": b.to_dict(),
            "after": a.to_dict(),
            "distill": run,
            "recovered_fraction": (b.perplexity - a.perplexity) / lost if lost > 0 else None,
        }
        if label == "structured":
            out[label]["shape"] = shape.to_dict()
        lines.append(quality_row(f"{label}, before distillation", b, f"{params / 1e6:.1f}M"))
        lines.append(
            quality_row(f"{label}, after {run['seconds']:.0f} s ({run['steps']} steps)", a, f"{params / 1e6:.1f}M")
        )
        print("\n".join(lines[-2:]), flush=True)
        folders[label] = str(
            save_folder(student.to(torch.bfloat16).cpu(), os.path.join(run_dir, f"{label}-model"), tokenizer)
        )
        student.cpu()
        write(args, "structured", out)
    print("\n".join(lines))
    return folders


def time_cuda(fn, iters: int = 20, warmup: int = 3) -> float:
    """Median milliseconds per call."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    return sorted(times)[len(times) // 2]


# Llama-3-8B linear shapes (out, in): fused q|k|v, o, fused gate|up, down.
LLAMA8B_LINEARS = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336)}


def _to_24(w: torch.Tensor, cutlass: bool):
    """The compressed 2:4 weight through cuSPARSELt (PyTorch's default) or CUTLASS."""
    from torch.sparse import SparseSemiStructuredTensor, to_sparse_semi_structured

    default = SparseSemiStructuredTensor._FORCE_CUTLASS
    SparseSemiStructuredTensor._FORCE_CUTLASS = cutlass
    try:
        return to_sparse_semi_structured(w)
    finally:
        SparseSemiStructuredTensor._FORCE_CUTLASS = default


def speed_linears(tokens: list[int]) -> list[dict]:
    """Each Llama-3-8B linear at each token count: dense cuBLAS vs 2:4 through cuSPARSELt and through CUTLASS."""
    from slimserve.compress.prune.masks import nm_mask

    rows = []
    for name, (n, k) in LLAMA8B_LINEARS.items():
        w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16)
        w = w.masked_fill(nm_mask(w.float().abs(), 2, 4), 0)
        backends = {"sparse": _to_24(w, cutlass=False), "cutlass": _to_24(w, cutlass=True)}
        for m in tokens:
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            ref = torch.nn.functional.linear(x, w).float()
            flops = 2 * m * n * k
            row = {"layer": name, "out": n, "in": k, "tokens": m}
            row["dense_ms"] = time_cuda(lambda x=x, w=w: torch.nn.functional.linear(x, w))
            row["dense_tflops"] = flops / row["dense_ms"] / 1e9
            row["dense_fraction_of_790"] = row["dense_tflops"] / 790
            for backend, ws in backends.items():
                try:
                    err = (torch.nn.functional.linear(x, ws).float() - ref).abs().max().item()
                    ms = time_cuda(lambda x=x, ws=ws: torch.nn.functional.linear(x, ws))
                except RuntimeError as e:  # a shape or dtype the backend does not take
                    row[f"{backend}_error"] = str(e).splitlines()[0]
                    continue
                row |= {f"{backend}_ms": ms, f"{backend}_speedup": row["dense_ms"] / ms,
                        f"{backend}_max_abs_diff": err}  # fmt: skip
            rows.append(row)
    return rows


def speed_prefill(num_layers: int, batch: int, seq: int) -> dict:
    """Prefill of a Llama-3-8B-shaped model (transformers' modeling, SDPA) with dense vs 2:4 linear layers."""
    from torch.sparse import to_sparse_semi_structured
    from transformers import AutoModelForCausalLM, LlamaConfig

    from slimserve.compress.prune.masks import nm_mask

    cfg = LlamaConfig(
        hidden_size=4096, intermediate_size=14336, num_hidden_layers=num_layers, num_attention_heads=32,
        num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192, rope_theta=500000.0,
    )  # fmt: skip
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16).eval()
    ids = torch.randint(0, cfg.vocab_size, (batch, seq), device="cuda")

    @torch.no_grad()
    def run():
        model.model(input_ids=ids, use_cache=False)  # the decoder stack: the LM head is not pruned

    linears = [m for n, m in model.model.named_modules() if isinstance(m, torch.nn.Linear)]
    with torch.no_grad():
        for lin in linears:
            lin.weight.masked_fill_(nm_mask(lin.weight.float().abs(), 2, 4), 0)
    dense = time_cuda(run, iters=5, warmup=2)
    with torch.no_grad():
        for lin in linears:
            lin.weight = torch.nn.Parameter(to_sparse_semi_structured(lin.weight.data), requires_grad=False)
    sparse = time_cuda(run, iters=5, warmup=2)
    linear_params = sum(lin.in_features * lin.out_features for lin in linears)
    flops = 2 * batch * seq * linear_params
    return {
        "layers": num_layers, "batch": batch, "seq": seq, "dense_ms": dense, "sparse_ms": sparse,
        "dense_tokens_per_s": batch * seq / dense * 1e3, "sparse_tokens_per_s": batch * seq / sparse * 1e3,
        "speedup": dense / sparse, "linear_tflops_dense": flops / dense / 1e9,
        "dense_linear_fraction_of_790": flops / dense / 1e9 / 790,
    }  # fmt: skip


def _engine_run(folder: str, prompts: list[list[int]], output_len: int, **engine_kwargs) -> tuple[dict, list]:
    """Batch-1 decode tok/s, prefill tok/s (every prompt, one output token) and generation throughput."""
    from slimserve import LLM, SamplingParams

    llm = LLM(folder, dtype="bfloat16", gpu_memory_utilization=0.45, **engine_kwargs)
    greedy = SamplingParams(temperature=0.0, max_tokens=output_len, ignore_eos=True)
    first = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True)
    llm.generate(prompts[:2], greedy, use_tqdm=False)  # warm up
    start = time.perf_counter()
    llm.generate([prompts[0]], greedy, use_tqdm=False)
    decode = output_len / (time.perf_counter() - start)
    start = time.perf_counter()
    llm.generate(prompts, first, use_tqdm=False)
    prefill = sum(len(p) for p in prompts) / (time.perf_counter() - start)
    start = time.perf_counter()
    outs = llm.generate(prompts, greedy, use_tqdm=False)
    seconds = time.perf_counter() - start
    n_in, n_out = sum(len(p) for p in prompts), len(prompts) * output_len
    result = {
        "batch1_decode_tok_s": decode,
        "prefill_tok_s": prefill,
        "throughput_out_tok_s": n_out / seconds,
        "throughput_total_tok_s": (n_in + n_out) / seconds,
        "sparse_layers": len(llm.engine.runner.sparse_layers) if hasattr(llm.engine, "runner") else None,
    }
    tokens = [o.outputs[0].token_ids for o in outs]
    del llm
    torch.cuda.empty_cache()
    return result, tokens


def random_prompts(vocab: int, count: int, length: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(0)
    return [torch.randint(10, vocab - 10, (length,), generator=g).tolist() for _ in range(count)]


def speed_engine(folders: dict[str, str], prompts: int, input_len: int, output_len: int) -> dict:
    """The engine on each folder (original vs pruned students): same random prompts."""
    from slimserve.config import ModelConfig

    out = {}
    for label, folder in folders.items():
        vocab = ModelConfig.from_folder(folder).vocab_size
        out[label], _ = _engine_run(folder, random_prompts(vocab, prompts, input_len), output_len)
        print(label, out[label], flush=True)
    return out


LLAMA1B = dict(
    hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
    head_dim=64, vocab_size=128256, max_position_embeddings=4096, rope_theta=500000.0, tie_word_embeddings=True,
)  # fmt: skip


def speed_engine_24(run_dir: str, prompts: int, input_len: int, output_len: int) -> dict:
    """A Llama-3.2-1B-shaped model (random weights) pruned 2:4 by magnitude: the engine with sparse kernels vs
    the same checkpoint with dense GEMMs, and whether their greedy tokens agree."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    from slimserve.checkpoint.random_model import word_level_tokenizer
    from slimserve.compress.prune import save_pruned

    cfg = LlamaConfig(**LLAMA1B)
    device = "cuda" if torch.cuda.is_available() else "cpu"  # the CPU only checks the script: no sparse kernels
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16).eval()
    config = SparsityConfig("magnitude", structure="2:4")
    prune_(model, config, device=device, progress=False)
    tokenizer = word_level_tokenizer(cfg.vocab_size)  # the engine loads one; the prompts are token ids
    folder = str(save_pruned(model.cpu(), config, os.path.join(run_dir, "llama1b-24"), tokenizer))
    del model
    torch.cuda.empty_cache()
    batch = random_prompts(cfg.vocab_size, prompts, input_len)
    graph_error = None
    try:
        sparse, sparse_tokens = _engine_run(folder, batch, output_len, sparse_kernels=True)
    except Exception as e:  # noqa: BLE001 - e.g. a kernel that CUDA graphs cannot capture: measure it eagerly
        graph_error = f"{type(e).__name__}: {e}"
        traceback.print_exc(limit=-6)
    if graph_error is not None:  # outside the handler, so the failed engine's memory is released first
        print(f"sparse kernels with CUDA graphs failed ({graph_error}); eager", flush=True)
        gc.collect()
        torch.cuda.empty_cache()
        sparse, sparse_tokens = _engine_run(folder, batch, output_len, sparse_kernels=True, enforce_eager=True)
        sparse["cuda_graph_error"] = graph_error
    dense, dense_tokens = _engine_run(folder, batch, output_len, sparse_kernels=False)
    same = sum(a == b for a, b in zip(sparse_tokens, dense_tokens))
    speedup = {k: sparse[k] / dense[k] for k in dense if k.endswith("tok_s")}
    return {"shape": "Llama-3.2-1B", "sparse_kernels": sparse, "dense_gemm": dense, "sparse_over_dense": speedup,
            "identical_outputs": same, "prompts": prompts, "input_len": input_len,
            "output_len": output_len}  # fmt: skip


SPEED_SECTIONS = ["linears", "prefill", "engine24"]


def _section(out: dict, key: str, fn, *a) -> None:
    """One measurement; a failure is recorded and the others still run."""
    start = time.perf_counter()
    try:
        out[key] = fn(*a)
    except Exception as e:  # noqa: BLE001 - a benchmark reports what broke and goes on
        out[key] = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc(limit=-6)}
    print(key, f"{time.perf_counter() - start:.1f}s", json.dumps(out[key])[:2000], flush=True)


def _ms(r: dict, backend: str) -> str:
    return f"{r[backend + '_ms']:.3f} ({r[backend + '_speedup']:.2f}x)" if backend + "_ms" in r else "failed"


def part_speed(args, device: torch.device, folders: dict[str, str], run_dir: str) -> None:
    out = header(args, device, "speed")
    if "linears" in args.speed:
        _section(out, "linears", speed_linears, [16, 256, 2048, 8192])
        if isinstance(out["linears"], list):
            print("| layer | tokens | dense ms | 2:4 cuSPARSELt ms | 2:4 CUTLASS ms | dense TFLOP/s |")
            print("|---|---:|---:|---:|---:|---:|")
            for r in out["linears"]:
                print(f"| {r['layer']} {r['out']}x{r['in']} | {r['tokens']} | {r['dense_ms']:.3f} | "
                      f"{_ms(r, 'sparse')} | {_ms(r, 'cutlass')} | {r['dense_tflops']:.0f} |")  # fmt: skip
        write(args, "speed", out)
    if "prefill" in args.speed:
        _section(out, "prefill_8b", speed_prefill, args.prefill_layers, 1, 4096)
        torch.cuda.empty_cache()
        write(args, "speed", out)
    if "engine24" in args.speed:
        _section(out, "engine_24", speed_engine_24, run_dir, args.engine_prompts, 1024, 64)
        write(args, "speed", out)
    if folders and "pruned" in args.speed:
        _section(out, "engine_pruned", speed_engine, folders, args.engine_prompts, 256, 128)
        write(args, "speed-pruned", out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="reference model: HF folder or .gguf")
    p.add_argument("--name", default="smollm2-135m")
    p.add_argument("--parts", nargs="+", default=["sparsity"], choices=["sparsity", "structured", "speed"])
    p.add_argument("--num-samples", type=int, default=32, help="calibration sequences")
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--context", type=int, default=2048)
    p.add_argument("--max-windows", type=int, default=4)
    p.add_argument("--target-fraction", type=float, default=0.75, help="structured: parameters kept")
    p.add_argument("--students", nargs="+", default=["structured", "gqa"], choices=["structured", "gqa"])
    p.add_argument("--kv-heads", type=int, default=1, help="GQA conversion target")
    p.add_argument("--distill-seconds", type=float, default=600, help="training time for the students together")
    p.add_argument("--structured-share", type=float, default=0.7, help="structured student's share of it")
    p.add_argument("--distill-steps", type=int, default=2000, help="schedule length (time may stop it first)")
    p.add_argument("--distill-rows", type=int, default=2048)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--prefill-layers", type=int, default=32)
    p.add_argument("--engine-prompts", type=int, default=128)
    p.add_argument(
        "--speed",
        nargs="+",
        default=["random", "pruned"],
        choices=[*SPEED_SECTIONS, "random", "pruned"],
        help="linears: 2:4 vs dense GEMMs (8B shapes); prefill: 8B decoder stack; engine24: the engine with and "
        "without sparse kernels on a 2:4 1B-shaped checkpoint; random: all three; pruned: the students",
    )
    p.add_argument("--out", default="benchmarks/results")
    args = p.parse_args()
    if "random" in args.speed:
        args.speed = [*SPEED_SECTIONS, *args.speed]
    torch.manual_seed(0)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    folders = {}
    run_dir = tempfile.mkdtemp(prefix="pruning-")
    if "sparsity" in args.parts or "structured" in args.parts:
        reference, tokenizer = load_causal_lm(args.model, torch.float32)
        text, _ = heldout_text()
        wins = windows(
            torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"]), args.context, args.max_windows
        )
        calib = Calibration(generic_samples(tokenizer, args.num_samples, args.seq_len), "generic")
        if "sparsity" in args.parts:
            part_sparsity(args, reference, tokenizer, wins, calib, device)
        if "structured" in args.parts:
            folders = part_structured(args, reference, tokenizer, wins, calib, device, run_dir)
            folders = {
                "original": str(
                    save_folder(reference.to(torch.bfloat16).cpu(), os.path.join(run_dir, "orig"), tokenizer)
                ),
                **folders,
            }
        del reference
    if "speed" in args.parts:
        part_speed(args, device, folders, run_dir)


if __name__ == "__main__":
    main()
