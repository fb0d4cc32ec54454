"""Triton 2/3/4-bit dequantizing GEMV, under the interpreter, against the plain-torch reference."""

import random

import pytest
import torch

pytest.importorskip("triton")

from slimserve.compress.quant.packing import pack_int32  # noqa: E402
from slimserve.kernels.lowbit_gemv import lowbit_gemv_triton  # noqa: E402
from slimserve.kernels.lowbit_gemv_ref import dequantize_packed, lowbit_gemv_ref  # noqa: E402


def _weights(n: int, k: int, bits: int, group: int, asym: bool, g: torch.Generator):
    lo, hi = -(1 << (bits - 1)), 1 << (bits - 1)
    q = torch.randint(lo, hi, (n, k), generator=g, dtype=torch.int8)
    scale = torch.rand(n, k // group, generator=g) * 0.1 + 0.01
    zero = (torch.rand(n, k // group, generator=g) * (hi - lo) + lo) if asym else None
    return q, pack_int32(q, bits), scale, zero


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize(
    "n,k,group,rows,asym,split_k",
    [(40, 256, 64, 1, True, None), (33, 320, 32, 2, False, 3), (16, 128, 128, 1, True, 1)],
    ids=["asym-split", "sym-odd-rows-2x", "one-group"],
)
def test_lowbit_gemv_matches_reference(bits, n, k, group, rows, asym, split_k):
    seed = random.randrange(2**31)
    g = torch.Generator().manual_seed(seed)
    q, packed, scale, zero = _weights(n, k, bits, group, asym, g)
    x = torch.randn(rows, k, generator=g)
    bias = torch.randn(n, generator=g)
    out = lowbit_gemv_triton(x, packed, scale, zero, bits, group, bias, block_n=16, block_k=32, split_k=split_k)
    ref = lowbit_gemv_ref(x, packed, scale, zero, bits, group, bias)
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4, msg=lambda m: f"seed {seed}: {m}")


def test_reference_dequantizes_codes():
    g = torch.Generator().manual_seed(0)
    q, packed, scale, zero = _weights(8, 96, 3, 32, True, g)
    expected = ((q.float().view(8, 3, 32) - zero.unsqueeze(-1)) * scale.unsqueeze(-1)).view(8, 96)
    torch.testing.assert_close(dequantize_packed(packed, scale, zero, 3, 32, 96), expected)
