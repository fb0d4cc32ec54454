"""Batch-1 decode with 2-, 3- and 4-bit weights against bf16, at an 8B-class shape (Llama-3-8B), on a GPU.

1. Checks the Triton dequantizing GEMV against its plain-torch reference at each shape.
2. Times each linear of a decoder layer (qkv, o, gate_up, down) per scheme with a cold L2 (do_bench), after
   a small search over tile sizes and split-K; bf16 is cuBLAS through F.linear.
3. Times a whole decode step: every layer's linears (32 layers), the SiLU-mul and residual adds, and the bf16
   lm_head, replayed from a CUDA graph. Attention and norms are left out: at batch 1 and short contexts the
   weights are nearly all the bytes a step reads (the KV cache of 1k tokens adds ~128 MB for this shape).
   "W4A16 dequant+matmul" dequantizes each weight to bf16 and runs cuBLAS: the path a runtime without a
   low-bit kernel takes.

Reports microseconds, achieved bandwidth and the fraction of 3.0 TB/s (the H100's HBM rate) of the bytes read.
Writes benchmarks/results/lowbit-<date>.json.

usage: python benchmarks/lowbit.py [--layers 32] [--hidden 4096] [--intermediate 14336] [--kv-heads 8]
                                   [--head-dim 128] [--vocab 128256]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from slimserve.kernels.lowbit_gemv import lowbit_gemv_triton
from slimserve.kernels.lowbit_gemv_ref import dequantize_packed, lowbit_gemv_ref

HBM_BYTES_PER_S = 3.0e12
DTYPE = torch.bfloat16
# (BLOCK_N, SPLIT_K or None for auto, warps)
TILES = [(32, None, 4), (64, None, 4), (128, None, 4), (64, None, 8), (128, None, 8), (256, None, 8), (128, 4, 8)]


@dataclass(frozen=True)
class Scheme:
    name: str
    bits: int | None  # None: bf16
    group: int = 128
    asym: bool = False
    dequant_matmul: bool = False


SCHEMES = [
    Scheme("bf16", None),
    Scheme("W4A16 g128 (Triton)", 4, 128),
    Scheme("W4A16 g128 dequant+matmul", 4, 128, dequant_matmul=True),
    Scheme("W3A16 g64 asym (Triton)", 3, 64, asym=True),
    Scheme("W2A16 g64 asym (Triton)", 2, 64, asym=True),
]


class QLinear:
    """Random packed codes of one (n, k) weight: any bit pattern is a valid code."""

    def __init__(self, n: int, k: int, s: Scheme, device: torch.device) -> None:
        self.s, self.n, self.k = s, n, k
        if s.bits is None:
            self.w = torch.randn(n, k, dtype=DTYPE, device=device) * 0.02
            return
        words = -(-k * s.bits // 32)
        self.packed = torch.randint(-(2**31), 2**31 - 1, (n, words), dtype=torch.int32, device=device)
        self.scale = (torch.rand(n, k // s.group, device=device) * 0.01 + 0.001).to(DTYPE)
        half = 1 << (s.bits - 1)
        self.zero = (torch.rand(n, k // s.group, device=device) * 2 * half - half).to(DTYPE) if s.asym else None
        self.tile = TILES[0]

    def bytes(self) -> int:
        if self.s.bits is None:
            return self.w.numel() * 2
        return sum(t.numel() * t.element_size() for t in (self.packed, self.scale, self.zero) if t is not None)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.s.bits is None:
            return F.linear(x, self.w)
        if self.s.dequant_matmul:
            w = dequantize_packed(self.packed, self.scale, self.zero, self.s.bits, self.s.group, self.k)
            return F.linear(x, w.to(DTYPE))
        block_n, split_k, warps = self.tile
        return lowbit_gemv_triton(
            x,
            self.packed,
            self.scale,
            self.zero,
            self.s.bits,
            self.s.group,
            block_n=block_n,
            split_k=split_k,
            num_warps=warps,
        )

    def reference(self, x: torch.Tensor) -> torch.Tensor:
        return lowbit_gemv_ref(x, self.packed, self.scale, self.zero, self.s.bits, self.s.group)


def bench(fn, cuda: bool) -> float:
    """Microseconds per call, cold L2 on CUDA."""
    if cuda:
        import triton.testing

        return triton.testing.do_bench(fn, warmup=10, rep=40) * 1e3
    import time

    fn()
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1e6


def graph_time(step, cuda: bool, replays: int = 20) -> float:
    """Microseconds per decode step, replayed from a CUDA graph."""
    if not cuda:
        return bench(step, False)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            step()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(replays):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) * 1e3 / replays


def layer_shapes(a: argparse.Namespace) -> dict[str, tuple[int, int]]:
    kv = a.kv_heads * a.head_dim
    return {
        "qkv": (a.hidden + 2 * kv, a.hidden),
        "o": (a.hidden, a.hidden),
        "gate_up": (2 * a.intermediate, a.hidden),
        "down": (a.hidden, a.intermediate),
    }


def per_linear(a, scheme: Scheme, device, cuda: bool, rows: list, checks: list) -> dict[str, tuple]:
    """Check, tune and time each linear shape; returns the best tile per shape."""
    tiles = {}
    x_all = {}
    for name, (n, k) in layer_shapes(a).items():
        lin = QLinear(n, k, scheme, device)
        x = x_all.setdefault(k, torch.randn(1, k, dtype=DTYPE, device=device))
        candidates = TILES if scheme.bits is not None and not scheme.dequant_matmul else [None]
        best = None
        for tile in candidates:
            if tile is not None:
                lin.tile = tile
            us = bench(lambda lin=lin, x=x: lin(x), cuda)
            if best is None or us < best[0]:
                best = (us, tile)
        us, tile = best
        if tile is not None:
            lin.tile = tile
            tiles[name] = tile
            ref = lin.reference(x).float()
            err = ((lin(x).float() - ref).norm() / ref.norm()).item()
            checks.append({"scheme": scheme.name, "shape": name, "relative_error": err})
        gbs = lin.bytes() / (us * 1e-6) / 1e9
        rows.append(
            {
                "scheme": scheme.name,
                "linear": f"{name} {n}x{k}",
                "us": us,
                "MB": lin.bytes() / 1e6,
                "GB/s": gbs,
                "frac_hbm": gbs * 1e9 / HBM_BYTES_PER_S,
                "tile": None if tile is None else {"block_n": tile[0], "split_k": tile[1] or "auto", "warps": tile[2]},
            }
        )
        del lin
    return tiles


def decode_step(a, scheme: Scheme, tiles: dict, device, cuda: bool) -> dict:
    shapes = layer_shapes(a)
    layers = []
    for _ in range(a.layers):
        layer = {name: QLinear(n, k, scheme, device) for name, (n, k) in shapes.items()}
        for name, lin in layer.items():
            if name in tiles:
                lin.tile = tiles[name]
        layers.append(layer)
    head = QLinear(a.vocab, a.hidden, SCHEMES[0], device)
    x = torch.randn(1, a.hidden, dtype=DTYPE, device=device)

    def step():
        h = x
        for layer in layers:
            qkv = layer["qkv"](h)
            h = h + layer["o"](qkv[:, : a.hidden])  # stands in for the attention output
            gu = layer["gate_up"](h)
            h = h + layer["down"](F.silu(gu[:, : a.intermediate]) * gu[:, a.intermediate :])
        return head(h)

    weight_bytes = sum(lin.bytes() for layer in layers for lin in layer.values()) + head.bytes()
    us = graph_time(step, cuda, replays=3 if scheme.dequant_matmul else 20)
    layers.clear()
    return {
        "scheme": scheme.name,
        "us_per_token": us,
        "tokens_per_s": 1e6 / us,
        "GB_read": weight_bytes / 1e9,
        "frac_hbm": weight_bytes / (us * 1e-6) / HBM_BYTES_PER_S,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--hidden", type=int, default=4096)
    p.add_argument("--intermediate", type=int, default=14336)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--vocab", type=int, default=128256)
    p.add_argument("--out", default="benchmarks/results")
    a = p.parse_args()
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    torch.manual_seed(0)
    rows, checks, decode = [], [], []
    for scheme in SCHEMES:
        tiles = per_linear(a, scheme, device, cuda, rows, checks)
        decode.append(decode_step(a, scheme, tiles, device, cuda))
        if cuda:
            torch.cuda.empty_cache()
    bf16 = decode[0]["us_per_token"]
    print("| scheme | linear | us | MB | GB/s | of HBM | BLOCK_N/split-K/warps |\n|---|---|---:|---:|---:|---:|---|")
    for r in rows:
        tile = "-" if r["tile"] is None else "/".join(str(v) for v in r["tile"].values())
        print(
            f"| {r['scheme']} | {r['linear']} | {r['us']:.1f} | {r['MB']:.1f} | {r['GB/s']:.0f} | "
            f"{r['frac_hbm']:.0%} | {tile} |"
        )
    print("\n| scheme | us/token | tok/s | GB read | of HBM | vs bf16 |\n|---|---:|---:|---:|---:|---:|")
    for d in decode:
        print(
            f"| {d['scheme']} | {d['us_per_token']:.0f} | {d['tokens_per_s']:.1f} | {d['GB_read']:.2f} | "
            f"{d['frac_hbm']:.0%} | {bf16 / d['us_per_token']:.2f}x |"
        )
    print(
        "\nkernel vs reference (relative error):",
        ", ".join(f"{c['scheme']}/{c['shape']}={c['relative_error']:.1e}" for c in checks),
    )
    date = datetime.datetime.now(datetime.timezone.utc)
    os.makedirs(a.out, exist_ok=True)
    path = os.path.join(a.out, f"lowbit-{date:%Y-%m-%d}.json")
    with open(path, "w") as f:
        json.dump(
            {
                "device": torch.cuda.get_device_name() if cuda else "cpu",
                "command": " ".join([sys.executable, *sys.argv]),
                "date": date.isoformat(),
                "torch": torch.__version__,
                "shape": vars(a),
                "linears": rows,
                "decode": decode,
                "checks": checks,
            },
            f,
            indent=2,
        )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
