"""GPTQ (Frantar et al., 2022): quantize a weight column by column and push each column's rounding error
onto the columns not yet quantized, weighted by the inverse Hessian of the layer's inputs (H = 2 X X^T / n).

FP8 weights (E4M3, per channel or per tensor) take the same loop, each column rounded to its nearest E4M3
value instead of an integer. Act-order processes columns by decreasing Hessian diagonal. With groups it keeps
"static" groups: every group's scale comes from its original columns before the loop, so the checkpoint needs
no column permutation (g_idx) and loads in every runtime."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from slimserve.compress.args import QuantArgs
from slimserve.compress.configs import GPTQOptions
from slimserve.compress.quant import observers, qdq
from slimserve.compress.quant.rtn import QuantizedWeight


class HessianAccumulator:
    """Running H = 2/n * sum x x^T over every input row a linear layer sees, in float32.

    H is symmetric: each add computes only the blocks on and above the diagonal of a BLOCKS x BLOCKS tiling
    (10 of 16 products), and `h` mirrors them below once, when read."""

    BLOCKS = 4
    MIN_BLOCK = 256  # narrower inputs take one product: tiling them saves nothing

    def __init__(self, in_features: int, device: torch.device) -> None:
        self._h = torch.zeros(in_features, in_features, dtype=torch.float32, device=device)
        self.n = 0
        k = max(1, min(self.BLOCKS, in_features // self.MIN_BLOCK))
        edges = [in_features * i // k for i in range(k + 1)]
        self._tiles = list(zip(edges[:-1], edges[1:]))
        self._mirrored = True

    @property
    def h(self) -> torch.Tensor:
        if not self._mirrored:
            for i, (a0, a1) in enumerate(self._tiles):
                for b0, b1 in self._tiles[i + 1 :]:
                    self._h[b0:b1, a0:a1] = self._h[a0:a1, b0:b1].t()
            self._mirrored = True
        return self._h

    def add(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).float()
        m = x.shape[0]
        self._h.mul_(self.n / (self.n + m))
        self.n += m
        x = x * (2.0 / self.n) ** 0.5
        for i, (a0, a1) in enumerate(self._tiles):
            for b0, b1 in self._tiles[i:]:
                self._h[a0:a1, b0:b1].addmm_(x[:, a0:a1].t(), x[:, b0:b1])
        self._mirrored = len(self._tiles) == 1


@contextmanager
def _one_thread_on_cpu(device: torch.device) -> Iterator[None]:
    """The per-column steps are vector operations far too small to split: on the CPU, more threads only add
    synchronization, which costs many times the work itself when other processes load the cores."""
    if device.type != "cpu":
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@dataclass
class GPTQResult:
    weight: QuantizedWeight
    damping: float  # the damping that made the Cholesky factorization succeed


def _inverse_cholesky(h: torch.Tensor, opts: GPTQOptions) -> tuple[torch.Tensor, float] | None:
    """Upper Cholesky factor of (H + damp * mean(diag H) * I)^-1, raising damp tenfold until it exists.
    H's diagonal is damped in place (the caller restores it): no square matrix more than needed.

    With J the reversal permutation and J H J = L L^T, the factor is J L^-1 J: one Cholesky and one
    triangular solve instead of a Cholesky, an inverse from it and a second Cholesky (four times faster)."""
    diagonal = torch.diagonal(h)
    mean_diag = diagonal.mean()
    damp, added = opts.damping, 0.0
    for _ in range(opts.max_damping_retries + 1):
        diagonal.add_((damp - added) * mean_diag)
        added = damp
        lower, info = torch.linalg.cholesky_ex(h.flip(0, 1))
        if info.item() == 0:
            inverse = torch.eye(h.shape[0], dtype=h.dtype, device=h.device)
            torch.linalg.solve_triangular(lower, inverse, upper=False, out=inverse)
            del lower
            upper = inverse.flip(0, 1)
            del inverse
            if torch.isfinite(upper).all():
                return upper, damp
        damp *= 10
    return None


def _column_params(
    w: torch.Tensor, args: QuantArgs, dtype: torch.dtype, observer: str
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Scale/zero point over the columns of w (out, k), one per row."""
    return qdq.qparams(*observers.row_range(w, args, observer), args, dtype)


def gptq(
    w: torch.Tensor, h: torch.Tensor, args: QuantArgs, opts: GPTQOptions, dtype: torch.dtype, observer: str = "minmax"
) -> GPTQResult | None:
    """Quantize w (out, in) given the Hessian of its inputs; None when H is unusable (not finite).

    A float32 h is borrowed rather than copied (at an 8B model's MLP width a copy costs most of a gigabyte
    of accelerator memory): only its diagonal changes while the inverse is computed, and it is restored."""
    supported = ("channel", "group") if args.type == "int" else ("channel", "tensor")
    if args.strategy not in supported:
        raise ValueError(f"GPTQ handles integer per-channel or group weights and FP8 per-channel or per-tensor "
                         f"weights, not {args.type}/{args.strategy}")  # fmt: skip
    if not torch.isfinite(h).all():
        return None
    h = h if h.dtype == torch.float32 else h.float()
    diagonal = torch.diagonal(h)
    saved = diagonal.clone()
    try:
        return _gptq(w, h, args, opts, dtype, observer)
    finally:
        diagonal.copy_(saved)


def _gptq(
    w: torch.Tensor, H: torch.Tensor, args: QuantArgs, opts: GPTQOptions, dtype: torch.dtype, observer: str
) -> GPTQResult | None:
    W = w.to(torch.float32, copy=True)
    rows, cols = W.shape
    dead = torch.diagonal(H) == 0
    torch.diagonal(H)[dead] = 1
    W[:, dead] = 0

    gs = args.group_size if args.strategy == "group" else cols
    groups = cols // gs
    scale = torch.empty(rows, groups, dtype=dtype, device=W.device)
    zp = None if args.symmetric else torch.empty(rows, groups, dtype=torch.int8, device=W.device)
    # Per-channel and per-tensor scales, and group scales under act-order, are fixed from the original weight.
    static = args.strategy != "group" or opts.actorder
    if args.strategy == "tensor":
        scale[:] = qdq.qparams(*observers.weight_range(W, args, observer), args, dtype)[0]  # as rtn sets it
    elif static:
        for g in range(groups):
            s, z = _column_params(W[:, g * gs : (g + 1) * gs], args, dtype, observer)
            scale[:, g : g + 1] = s
            if zp is not None:
                zp[:, g : g + 1] = z

    perm = torch.argsort(torch.diagonal(H), descending=True) if opts.actorder else torch.arange(cols)
    perm = perm.to(W.device)
    order = perm.tolist()  # read column indices on the host: no device sync per column
    if opts.actorder:
        W, H = W[:, perm], H[perm][:, perm]
    inv = _inverse_cholesky(H, opts)
    del H
    if inv is None:
        return None
    hinv, damp = inv

    # Blocks hold whole groups so that a group's dynamic scale is set while all its columns are in the block.
    # The loop runs on the transpose, where a column is a contiguous row and its error update one BLAS ger.
    bs = max(opts.block_size // gs, 1) * gs if not static else opts.block_size
    fp8 = args.type == "float"
    Wt = W.t().contiguous()
    del W
    Qt = torch.zeros_like(Wt)
    scale_t = scale.float().t().contiguous()
    zp_t = None if zp is None else zp.float().t().contiguous()
    for i1 in range(0, cols, bs):
        i2 = min(i1 + bs, cols)
        W1 = Wt[i1:i2].clone()
        err1 = torch.zeros_like(W1)
        hinv1 = hinv[i1:i2, i1:i2]
        with _one_thread_on_cpu(Wt.device):
            for i in range(i2 - i1):
                col = order[i1 + i]
                g = col // gs
                if not static and col % gs == 0:
                    s, z = _column_params(W1[i : i + gs].t(), args, dtype, observer)
                    scale[:, g : g + 1] = s
                    scale_t[g] = s[:, 0].float()
                    if zp is not None:
                        zp[:, g : g + 1] = z
                        zp_t[g] = z[:, 0].float()
                s = scale_t[g]
                if fp8:  # the nearest E4M3 value (its steps widen with the magnitude)
                    q = (W1[i] / s).clamp_(args.qmin, args.qmax).to(torch.float8_e4m3fn).float()
                    deq = q * s
                elif zp_t is None:
                    q = (W1[i] / s).clamp_(args.qmin, args.qmax).round_()
                    deq = q * s
                else:
                    z = zp_t[g]
                    q = (W1[i] / s + z).clamp_(args.qmin, args.qmax).round_()
                    deq = (q - z) * s
                Qt[i1 + i] = q
                e = (W1[i] - deq) / hinv1[i, i]
                W1[i:].addr_(hinv1[i, i:], e, alpha=-1)
                err1[i] = e
        Wt[i2:].addmm_(hinv[i1:i2, i2:].t(), err1, alpha=-1)

    Q = Qt.t()[:, torch.argsort(perm)]
    if fp8:
        scale = scale[:1, 0] if args.strategy == "tensor" else scale  # compressed-tensors' per-tensor shape (1,)
        return GPTQResult(QuantizedWeight(Q.to(torch.float8_e4m3fn), scale, zp), damp)
    return GPTQResult(QuantizedWeight(Q.to(torch.int8), scale, zp), damp)
