"""Triton fused MoE, under the interpreter, against the plain-torch reference: odd token counts, experts
that get no token, top-k 1/2/8, and expert ranges (the split expert parallelism uses)."""

import random

import pytest
import torch

pytest.importorskip("triton")

from slimserve.kernels.fused_moe import align_pairs_to_experts, fused_moe_triton  # noqa: E402
from slimserve.kernels.fused_moe_ref import Fp8ExpertScales, fused_moe_ref  # noqa: E402
from slimserve.layers.moe import select_experts  # noqa: E402

TOLERANCES = {
    torch.float32: dict(atol=1e-5, rtol=1e-4),
    # bf16 outputs of a long fp32 accumulation: the kernel rounds once, the reference after each GEMM.
    torch.bfloat16: dict(atol=3e-2, rtol=3e-2),
}


def make_inputs(seed: int, tokens: int, hidden: int, inter: int, experts: int, top_k: int, dtype: torch.dtype):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, hidden, generator=g).to(dtype)
    w13 = (torch.randn(experts, 2 * inter, hidden, generator=g) / hidden**0.5).to(dtype)
    w2 = (torch.randn(experts, hidden, inter, generator=g) / inter**0.5).to(dtype)
    # Skewed router logits: some experts get many tokens, some none.
    logits = torch.randn(tokens, experts, generator=g) + 3 * torch.linspace(0, 1, experts)
    weights, ids = select_experts(logits.to(dtype), top_k, renormalize=top_k > 1, round_weights=False)
    return x, w13, w2, weights, ids


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    "tokens,hidden,inter,experts,top_k",
    [(1, 32, 16, 4, 1), (7, 64, 48, 8, 2), (37, 96, 80, 16, 8), (70, 64, 32, 4, 2)],
    ids=["decode-top1", "odd-top2", "top8-odd-sizes", "large-blocks"],
)
def test_fused_moe_matches_reference(dtype, tokens, hidden, inter, experts, top_k):
    seed = random.randrange(2**31)
    x, w13, w2, weights, ids = make_inputs(seed, tokens, hidden, inter, experts, top_k, dtype)
    out = fused_moe_triton(x, w13, w2, weights, ids)
    expected = fused_moe_ref(x, w13, w2, weights, ids)
    torch.testing.assert_close(out, expected, **TOLERANCES[dtype], msg=lambda m: f"seed {seed}: {m}")


def test_expert_ranges_sum_to_the_whole():
    """Two banks holding experts [0, 3) and [3, 8) give partial outputs that add up to the full layer."""
    seed = random.randrange(2**31)
    x, w13, w2, weights, ids = make_inputs(seed, 9, 32, 24, 8, 2, torch.float32)
    full = fused_moe_ref(x, w13, w2, weights, ids)
    low = fused_moe_triton(x, w13[:3], w2[:3], weights, ids, expert_start=0, num_experts=8)
    high = fused_moe_triton(x, w13[3:], w2[3:], weights, ids, expert_start=3, num_experts=8)
    torch.testing.assert_close(low + high, full, atol=1e-5, rtol=1e-4, msg=lambda m: f"seed {seed}: {m}")
    torch.testing.assert_close(high, fused_moe_ref(x, w13[3:], w2[3:], weights, ids, expert_start=3))


def test_alignment_groups_pairs_by_expert():
    ids = torch.tensor([[2, 0], [2, 3], [0, 2], [5, 2]])  # expert 1 gets nothing, expert 5 is held elsewhere
    blocks = align_pairs_to_experts(ids, num_local=4, expert_start=0, block_m=4)
    pairs = blocks.sorted_pairs.view(-1, 4)
    num_pairs = ids.numel()
    for block, expert in zip(pairs, blocks.block_expert.tolist()):
        real = block[block < num_pairs]
        if expert < 0:
            assert real.numel() == 0
            continue
        assert (ids.view(-1)[real.long()] == expert).all()
    held = sorted(blocks.sorted_pairs[blocks.sorted_pairs < num_pairs].tolist())
    assert held == [i for i, e in enumerate(ids.view(-1).tolist()) if e < 4]
    assert blocks.block_expert.tolist().count(2) == 1 and 1 not in blocks.block_expert.tolist()


def fp8_experts(w13: torch.Tensor, w2: torch.Tensor, act: str | None, per_tensor: bool, seed: int):
    """FP8 banks with per-expert per-output-channel scales (or one scale per expert matrix), and random static
    input scales of the size calibration gives."""
    g = torch.Generator().manual_seed(seed)

    def quantize(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        amax = w.float().abs().amax(dim=2, keepdim=not per_tensor)
        if per_tensor:
            amax = amax.amax(dim=1, keepdim=True)[..., None]
        scale = amax / 448.0
        return (w.float() / scale).to(torch.float8_e4m3fn), scale.squeeze(-1).expand(w.shape[:2]).contiguous()

    (q13, s13), (q2, s2) = quantize(w13), quantize(w2)
    static = {}
    if act == "static":
        experts = w13.shape[0]
        # Ranges of 4.5 to 9 for gate|up inputs (randn) and 7 to 11 for down inputs: nothing clips.
        static = dict(a13_scale=torch.rand(experts, generator=g) * 0.01 + 0.01,
                      a2_scale=torch.rand(experts, generator=g) * 0.01 + 0.015)  # fmt: skip
    return q13, q2, Fp8ExpertScales(s13, s2, act, **static)


DECODE, ODD_TOP8, LARGE = (1, 32, 16, 4, 1), (13, 96, 80, 16, 8), (41, 64, 48, 6, 2)
FP8_CASES = [  # (activations, per-tensor weight scales, dtype, shape)
    (None, False, torch.float32, DECODE),
    (None, True, torch.float32, ODD_TOP8),
    (None, False, torch.bfloat16, LARGE),
    ("dynamic", False, torch.float32, ODD_TOP8),
    ("dynamic", True, torch.bfloat16, DECODE),
    ("dynamic", False, torch.float32, LARGE),
    ("static", True, torch.float32, DECODE),
    ("static", False, torch.bfloat16, ODD_TOP8),
]


@pytest.mark.parametrize(
    "act,per_tensor,dtype,shape",
    FP8_CASES,
    ids=[f"{a or 'weight-only'}-{'tensor' if t else 'channel'}-{str(d)[6:]}-{s[0]}tok" for a, t, d, s in FP8_CASES],
)
def test_fp8_experts_match_reference(act, per_tensor, dtype, shape):
    """FP8 weights scaled in the epilogue, with unquantized, per-token or static per-expert FP8 activations."""
    seed = random.randrange(2**31)
    x, w13, w2, weights, ids = make_inputs(seed, *shape, dtype)
    q13, q2, scales = fp8_experts(w13, w2, act, per_tensor, seed)
    out = fused_moe_triton(x, q13, q2, weights, ids, scales=scales)
    expected = fused_moe_ref(x, q13, q2, weights, ids, scales=scales)
    if act is None or dtype == torch.float32:
        tol = TOLERANCES[dtype] if act is None else dict(atol=3e-2, rtol=3e-2)  # an FP8 rounding flip: ~1/16
        torch.testing.assert_close(out, expected, **tol, msg=lambda m: f"seed {seed}: {m}")
    else:  # bf16 intermediates one ulp apart (rounded by the interpreter) land on either side of an FP8 step
        assert ((out.float() - expected.float()).norm() / expected.float().norm()).item() < 4e-2, f"seed {seed}"
    if act is None and dtype == torch.float32:  # weight-only: exactly the MoE of the dequantized weights
        w13_deq, w2_deq = q13.float() * scales.w13_scale[..., None], q2.float() * scales.w2_scale[..., None]
        dense = fused_moe_ref(x, w13_deq, w2_deq, weights, ids)
        torch.testing.assert_close(out, dense, **TOLERANCES[dtype], msg=lambda m: f"seed {seed}: {m}")


def test_fp8_expert_ranges_sum_to_the_whole():
    seed = random.randrange(2**31)
    x, w13, w2, weights, ids = make_inputs(seed, 9, 32, 24, 8, 2, torch.float32)
    q13, q2, s = fp8_experts(w13, w2, "static", False, seed)
    full = fused_moe_ref(x, q13, q2, weights, ids, scales=s)
    parts = [
        fused_moe_triton(x, q13[lo:hi], q2[lo:hi], weights, ids, lo, 8, Fp8ExpertScales(
            s.w13_scale[lo:hi], s.w2_scale[lo:hi], "static", s.a13_scale[lo:hi], s.a2_scale[lo:hi]))
        for lo, hi in ((0, 3), (3, 8))
    ]  # fmt: skip
    torch.testing.assert_close(parts[0] + parts[1], full, atol=1e-5, rtol=1e-4, msg=lambda m: f"seed {seed}: {m}")
