"""Triton kernels on a GPU: each checked against its plain-torch reference (relative error, bf16) and timed
at the shapes of real models.

Each kernel is timed twice, both with a cold L2: launched from Python (do_bench; small kernels then measure
mostly the launch) and replayed from a CUDA graph (what the engine's captured decode steps see). The
achieved rates use the graph time: memory-bound kernels report bandwidth as a fraction of the HBM copy rate,
prefill attention reports TFLOP/s as a fraction of the bf16 matrix rate. A CUDA-graph check replays a
captured decode step with new sequence lengths and block tables. Writes benchmarks/results/kernels-<date>.json.

usage: python benchmarks/kernel_speed.py [--models llama-3.2-1b qwen3-0.6b] [--batches 1 16 64 256]
                                    [--contexts 128 1024 8192] [--prefill-tokens 2048] [--block-size 16]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
import triton.testing

from slimserve.kernels.activation import silu_and_mul_triton
from slimserve.kernels.activation_ref import silu_and_mul_ref
from slimserve.kernels.attention import paged_attention, paged_attention_triton
from slimserve.kernels.attention_ref import paged_attention_ref
from slimserve.kernels.gemv import _gemv_tuned, norm_gemv_triton, silu_mul_gemv_triton
from slimserve.kernels.gemv_ref import norm_gemv_ref, silu_mul_gemv_ref
from slimserve.kernels.norm import rms_norm_triton
from slimserve.kernels.norm_ref import rms_norm_ref
from slimserve.kernels.rope_store import rope_and_store_triton
from slimserve.kernels.rope_store_ref import rope_and_store_ref

HBM_BYTES_PER_S = 3.0e12
BF16_FLOPS_PER_S = 790e12
DTYPE = torch.bfloat16


@dataclass(frozen=True)
class ModelShape:
    heads: int
    kv_heads: int
    head_dim: int
    hidden: int
    intermediate: int


MODELS = {
    "llama-3.2-1b": ModelShape(heads=32, kv_heads=8, head_dim=64, hidden=2048, intermediate=8192),
    "qwen3-0.6b": ModelShape(heads=16, kv_heads=8, head_dim=128, hidden=1024, intermediate=3072),
    "llama-3.1-8b": ModelShape(heads=32, kv_heads=8, head_dim=128, hidden=4096, intermediate=14336),
    "smollm2-135m": ModelShape(heads=9, kv_heads=3, head_dim=64, hidden=576, intermediate=1536),
}


@dataclass
class Row:
    kernel: str
    model: str
    shape: str
    rel_error: float
    time_us: float | None = None  # launched from Python
    graph_us: float | None = None  # replayed from a CUDA graph
    achieved: float | None = None  # GB/s or TFLOP/s, as `unit` says
    unit: str = ""
    fraction_of_peak: float | None = None


def rel_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.float(), ref.float()
    return ((out - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def graph_us(fn: Callable[[], object], reps: int = 20) -> float:
    """Time of fn replayed from a CUDA graph with a cold L2, as in a real forward pass (where the weights and KV
    cache of the other layers pass through L2 in between): a graph of `reps` (flush, fn) pairs minus a graph
    of the flushes alone."""
    flush = torch.empty(2 * torch.cuda.get_device_properties().L2_cache_size, dtype=torch.int8, device="cuda")

    def capture(body: Callable[[], object]) -> torch.cuda.CUDAGraph:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for _ in range(reps):
                body()
        return graph

    fn()  # compile outside the capture
    with_fn = capture(lambda: (flush.zero_(), fn()))
    flushes = capture(flush.zero_)
    replay = lambda g: triton.testing.do_bench(g.replay, warmup=5, rep=100, return_mode="median")
    return (replay(with_fn) - replay(flushes)) * 1e3 / reps


def time_us(fn: Callable[[], object]) -> tuple[float, float]:
    """(launched from Python, replayed from a CUDA graph), in microseconds; both with a cold L2."""
    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median") * 1e3, graph_us(fn)


def memory_row(kernel: str, model: str, shape: str, err: float, fn: Callable[[], object], nbytes: float) -> Row:
    eager, graph = time_us(fn)
    rate = nbytes / (graph * 1e-6)
    return Row(kernel, model, shape, err, eager, graph, rate / 1e9, "GB/s", rate / HBM_BYTES_PER_S)


def paged_batch(
    m: ModelShape, q_lens: list[int], seq_lens: list[int], block_size: int, table_width: int | None = None
) -> dict:
    """Random queries and a randomly paged, randomly filled bf16 KV cache holding every sequence."""
    blocks = [-(-s // block_size) for s in seq_lens]
    width = table_width or max(blocks)
    num_blocks = sum(blocks)
    order = torch.randperm(num_blocks, device="cuda", dtype=torch.int32)
    tables = torch.zeros((len(seq_lens), width), dtype=torch.int32, device="cuda")
    used = 0
    for i, n in enumerate(blocks):
        tables[i, :n] = order[used : used + n]
        used += n
    shape = (num_blocks, block_size, m.kv_heads, m.head_dim)
    cu = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=torch.int32, device="cuda")
    return dict(
        q=torch.randn(sum(q_lens), m.heads, m.head_dim, device="cuda", dtype=DTYPE),
        k_cache=torch.randn(shape, device="cuda", dtype=DTYPE),
        v_cache=torch.randn(shape, device="cuda", dtype=DTYPE),
        cu_seqlens_q=cu,
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device="cuda"),
        block_tables=tables,
        scale=m.head_dim**-0.5,
    )


def bench_decode(name: str, m: ModelShape, batch: int, context: int, block_size: int) -> Row:
    b = paged_batch(m, [1] * batch, [context] * batch, block_size)
    run = lambda: paged_attention_triton(**b, max_seqlen_q=1)
    err = rel_error(run(), paged_attention_ref(**b))
    kv_bytes = 2 * batch * context * m.kv_heads * m.head_dim * DTYPE.itemsize
    q_out_bytes = 2 * b["q"].numel() * DTYPE.itemsize
    shape = f"decode B={batch} ctx={context}"
    return memory_row("paged_attention", name, shape, err, run, kv_bytes + q_out_bytes)


def bench_prefill(name: str, m: ModelShape, new_tokens: int, cached: int, block_size: int) -> Row:
    seq_len = cached + new_tokens
    b = paged_batch(m, [new_tokens], [seq_len], block_size)
    run = lambda: paged_attention_triton(**b, max_seqlen_q=new_tokens)
    err = rel_error(run(), paged_attention_ref(**b))
    # Query i (0-based) of the chunk sees cached + i + 1 keys; QK^T and PV are 2 * D flops per pair each.
    pairs = new_tokens * cached + new_tokens * (new_tokens + 1) // 2
    flops = 4 * pairs * m.head_dim * m.heads
    eager, graph = time_us(run)
    rate = flops / (graph * 1e-6)
    shape = f"prefill {new_tokens}" + (f" after {cached} cached" if cached else "")
    return Row("paged_attention", name, shape, err, eager, graph, rate / 1e12, "TFLOP/s", rate / BF16_FLOPS_PER_S)


def check_graph_replay(name: str, m: ModelShape, batch: int, context: int, block_size: int) -> Row:
    """Capture a decode step, then replay it on new lengths and block tables written into the same tensors."""
    width = -(-context // block_size)
    b = paged_batch(m, [1] * batch, [context] * batch, block_size, table_width=width)
    paged_attention(**b, max_seqlen_q=1)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = paged_attention(**b, max_seqlen_q=1)
    b["seq_lens"].copy_(torch.randint(1, context + 1, (batch,), device="cuda", dtype=torch.int32))
    b["block_tables"].copy_(b["block_tables"][torch.randperm(batch, device="cuda")])
    b["q"].normal_()
    graph.replay()
    return Row("paged_attention (CUDA graph replay)", name, f"decode B={batch} ctx<={context}",
               rel_error(out, paged_attention_ref(**b)))  # fmt: skip


def bench_rope_store(name: str, m: ModelShape, tokens: int, block_size: int) -> Row:
    """The fused attention prologue: q/k norm, rotary, KV-cache write, from the fused q|k|v output."""
    num_blocks = -(-4 * tokens // block_size)
    shape = (num_blocks, block_size, m.kv_heads, m.head_dim)
    caches = [torch.zeros(shape, device="cuda", dtype=DTYPE) for _ in range(4)]
    qkv = torch.randn(tokens, (m.heads + 2 * m.kv_heads) * m.head_dim, device="cuda", dtype=DTYPE)
    slots = torch.randperm(num_blocks * block_size, device="cuda", dtype=torch.int32)[:tokens]
    slots[::7] = -1
    positions = torch.randint(0, 8192, (tokens,), device="cuda")
    inv_freq = 1.0 / (10000 ** (torch.arange(0, m.head_dim, 2, device="cuda").float() / m.head_dim))
    freqs = torch.outer(torch.arange(8192, device="cuda").float(), inv_freq)
    cache = torch.cat((freqs.cos(), freqs.sin()), dim=-1)
    norms = [torch.rand(m.head_dim, device="cuda", dtype=DTYPE) + 0.5 for _ in range(2)]
    args = (qkv, positions, cache)
    rest = (slots, m.heads, m.kv_heads, *norms, 1e-6)
    q = rope_and_store_triton(*args, caches[0], caches[1], *rest)
    q_ref = rope_and_store_ref(*args, caches[2], caches[3], *rest)
    err = max(rel_error(q, q_ref), rel_error(caches[0], caches[2]), rel_error(caches[1], caches[3]))
    run = lambda: rope_and_store_triton(*args, caches[0], caches[1], *rest)
    return memory_row("rope_and_store", name, f"T={tokens}", err, run, 2 * qkv.numel() * DTYPE.itemsize)


def bench_rms_norm(name: str, m: ModelShape, tokens: int) -> list[Row]:
    x, res = (torch.randn(tokens, m.hidden, device="cuda", dtype=DTYPE) for _ in range(2))
    w = torch.randn(m.hidden, device="cuda", dtype=DTYPE)
    rows = []
    for residual, io in ((None, 2), (res, 4)):
        out = rms_norm_triton(x, w, 1e-6, residual)
        ref = rms_norm_ref(x, w, 1e-6, residual)
        err = rel_error(out[0], ref[0]) if residual is not None else rel_error(out, ref)
        run = lambda r=residual: rms_norm_triton(x, w, 1e-6, r)
        label = f"T={tokens} hidden={m.hidden}" + (" +residual" if residual is not None else "")
        rows.append(memory_row("rms_norm", name, label, err, run, io * x.numel() * DTYPE.itemsize))
    return rows


def bench_silu(name: str, m: ModelShape, tokens: int) -> Row:
    x = torch.randn(tokens, 2 * m.intermediate, device="cuda", dtype=DTYPE)
    err = rel_error(silu_and_mul_triton(x), silu_and_mul_ref(x))
    run = lambda: silu_and_mul_triton(x)
    label = f"T={tokens} I={m.intermediate}"
    return memory_row("silu_and_mul", name, label, err, run, 3 * tokens * m.intermediate * DTYPE.itemsize)


def bench_gemv(name: str, m: ModelShape, tokens: int) -> list[Row]:
    """Decode GEMVs of a few rows with their fused prologue against the unfused kernels (Triton norm or SiLU,
    then cuBLAS) at q|k|v, gate|up and down; bandwidth counts the weight bytes."""
    q, kv = m.heads * m.head_dim, m.kv_heads * m.head_dim
    rand = lambda *shape: torch.randn(*shape, device="cuda", dtype=DTYPE)  # noqa: E731
    x, res, norm_w = rand(tokens, m.hidden), rand(tokens, m.hidden), 1 + 0.1 * rand(m.hidden)
    rows = []
    for proj, n in (("q|k|v", q + 2 * kv), ("gate|up", 2 * m.intermediate)):
        w = rand(n, m.hidden) / m.hidden**0.5
        out = norm_gemv_triton(x, w, None, norm_w, 1e-6, res)
        err = rel_error(out[0], norm_gemv_ref(x, w, None, norm_w, 1e-6, res)[0])
        shape = f"{proj} {n}x{m.hidden}, {tokens} rows"
        nbytes = w.numel() * DTYPE.itemsize
        fused = memory_row(
            "norm+gemv (fused)",
            name,
            shape,
            err,
            lambda w=w: norm_gemv_triton(x, w, None, norm_w, 1e-6, res),
            nbytes,
        )
        fused.kernel += f" {_gemv_tuned.best_config}"
        unfused = lambda w=w: torch.nn.functional.linear(rms_norm_triton(x, norm_w, 1e-6, res)[0], w)  # noqa: E731
        rows += [fused, memory_row("norm, cuBLAS (unfused)", name, shape, 0.0, unfused, nbytes)]
    w = rand(m.hidden, m.intermediate) / m.intermediate**0.5
    gate_up = rand(tokens, 2 * m.intermediate)
    err = rel_error(silu_mul_gemv_triton(gate_up, w), silu_mul_gemv_ref(gate_up, w))
    shape, nbytes = f"down {m.hidden}x{m.intermediate}, {tokens} rows", w.numel() * DTYPE.itemsize
    fused = memory_row("silu+gemv (fused)", name, shape, err, lambda: silu_mul_gemv_triton(gate_up, w), nbytes)
    fused.kernel += f" {_gemv_tuned.best_config}"
    unfused = lambda: torch.nn.functional.linear(silu_and_mul_triton(gate_up), w)  # noqa: E731
    rows += [fused, memory_row("silu, cuBLAS (unfused)", name, shape, 0.0, unfused, nbytes)]
    return rows


def print_table(rows: list[Row]) -> None:
    head = f"{'kernel':<60} {'model':<13} {'shape':<28} {'rel err':>9} {'us':>8} {'graph us':>9} {'achieved':>17}"
    print(head, f"{'peak':>6}")
    for r in rows:
        timing = ""
        if r.time_us is not None:
            timing = (
                f"{r.time_us:8.1f} {r.graph_us:9.1f} {r.achieved:9.1f} {r.unit:<7} {100 * r.fraction_of_peak:5.1f}%"
            )
        print(f"{r.kernel:<60} {r.model:<13} {r.shape:<28} {r.rel_error:9.2e} {timing}")


PARTS = ("attention", "gemv", "elementwise")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", choices=sorted(MODELS), default=["llama-3.2-1b", "qwen3-0.6b"])
    p.add_argument("--batches", nargs="+", type=int, default=[1, 16, 64, 256])
    p.add_argument("--contexts", nargs="+", type=int, default=[128, 1024, 8192])
    p.add_argument("--prefill-tokens", type=int, default=2048)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--gemv-rows", nargs="+", type=int, default=[1, 5, 8], help="rows of the fused decode GEMVs")
    p.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS))
    p.add_argument("--out", default=None, help="JSON path (default benchmarks/results/kernels-<date>.json)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        print("benchmarks/kernel_speed.py needs a CUDA GPU", file=sys.stderr)
        return 1
    torch.manual_seed(0)
    rows: list[Row] = []
    for name in args.models:
        m = MODELS[name]
        n = args.prefill_tokens
        if "attention" in args.parts:
            for batch in args.batches:
                for context in args.contexts:
                    rows.append(bench_decode(name, m, batch, context, args.block_size))
            rows.append(bench_prefill(name, m, n, 0, args.block_size))
            rows.append(bench_prefill(name, m, n, 3 * n, args.block_size))
            rows.append(check_graph_replay(name, m, 8, max(args.contexts), args.block_size))
        if "gemv" in args.parts:
            for tokens in args.gemv_rows:
                rows.extend(bench_gemv(name, m, tokens))
        if "elementwise" in args.parts:
            for tokens in sorted({*args.batches, n}):
                rows.append(bench_rope_store(name, m, tokens, args.block_size))
                rows.extend(bench_rms_norm(name, m, tokens))
                rows.append(bench_silu(name, m, tokens))
        torch.cuda.empty_cache()
    print_table(rows)

    date = datetime.date.today().isoformat()
    path = args.out or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", f"kernels-{date}.json")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    report = dict(
        date=date,
        device=torch.cuda.get_device_name(),
        command=" ".join([sys.executable, *sys.argv]),
        torch=torch.__version__,
        triton=triton.__version__,
        dtype=str(DTYPE),
        peaks=dict(hbm_bytes_per_s=HBM_BYTES_PER_S, bf16_flops_per_s=BF16_FLOPS_PER_S),
        rows=[asdict(r) for r in rows],
    )
    with open(path, "w") as f:
        json.dump(report, f, indent=2)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
