"""Quantized GEMMs in Triton, beside the plain-torch reference in quant_gemm_ref.py (the same function for both
kernels here).

The tensor-core kernel, its weight format and activation type chosen at compile time:
- A16 (W4A16, W8A16, FP8 weights with bf16 activations): each K tile of packed codes is loaded once,
  unpacked in registers (shift and mask), dequantized with its group's scale (and zero point) and fed to a
  tensor-core dot with the activations; fp32 accumulation.
- A8 (W4A8, block-FP8 W8A8): FP8 activations times INT4 codes (exact in E4M3) or FP8 weights, one dot per
  group, each partial product scaled by its weight group's scale and its token group's scale.

Two launch shapes: up to 16 tokens (decode) the GEMM is a GEMV bound by the weight bytes, so programs take
narrow column tiles and split K (partial sums in fp32, added by the host) until the grid fills the GPU
twice over; beyond that, 64/128-row tiles without splitting, where the dot dominates.

The CUDA-core GEMV (int_gemv_triton) takes a few tokens of integer weights (W4A16, W8A16, W4A8 with per-token
activation scales), where padding to a 16-row dot wastes the tensor cores and unpacking dominates: input-major
words (loaded 16 bytes per thread along N), each code turned into a float by one mask-or and one subtraction
(no conversion instruction), scales and zero points applied once per word, split K finished by the last slice
to arrive (no second kernel), and a launch table measured per shape (GEMV_CONFIGS). Its epilogue can carry the
RMSNorms around it (int_gemv_norm): the output and down projections add the residual and leave h * gain with
sum(h**2) for the next norm, whose GEMV scales its outputs by 1 / rms, and the gate|up GEMV applies SiLU-and-multiply
(each column tile takes matching gate and up columns), so an integer-weight decoder layer runs no norm or
activation kernel."""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from slimserve.kernels.common import pdl_options
from slimserve.kernels.dispatch import HAS_TRITON, INTERPRETED, use_triton
from slimserve.kernels.quant_gemm_ref import NormIn, NormOut, QuantWeight, int_gemv_norm_ref, quant_gemm_ref

if HAS_TRITON:
    import triton
    import triton.language as tl

    from slimserve.kernels.common import dot as _dot
    from slimserve.kernels.common import wait_for_previous

    @triton.jit
    def _quant_gemm_kernel(
        x_ptr,
        w_ptr,
        s_ptr,
        z_ptr,
        xs_ptr,
        out_ptr,
        M,
        N,
        K,
        k_per_split,
        stride_xm,
        stride_wn,
        stride_wk,
        stride_sn,
        stride_sg,
        stride_zn,
        stride_zg,
        stride_xsm,
        stride_om,
        stride_os,
        BITS: tl.constexpr,
        W_FP8: tl.constexpr,
        A_FP8: tl.constexpr,
        HAS_ZERO: tl.constexpr,
        GROUP: tl.constexpr,
        SCALE_BLOCK_N: tl.constexpr,
        X_GROUP: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
        SPLIT: tl.constexpr,
        UPCAST: tl.constexpr,
    ):
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
        pid_k = tl.program_id(2)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        m_mask = offs_m < M
        n_mask = offs_n < N
        rows_w = offs_n.to(tl.int64)
        k_lo = pid_k * k_per_split
        k_hi = tl.minimum(k_lo + k_per_split, K)
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for k0 in range(k_lo, k_hi, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            k_mask = offs_k < K
            x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :], mask=m_mask[:, None] & k_mask[None, :],
                        other=0.0)  # fmt: skip
            if W_FP8:
                w = tl.load(w_ptr + rows_w[:, None] * stride_wn + offs_k[None, :] * stride_wk,
                            mask=n_mask[:, None] & k_mask[None, :], other=0.0)  # fmt: skip
            else:
                PER_WORD: tl.constexpr = 32 // BITS
                offs_w = k0 // PER_WORD + tl.arange(0, BLOCK_K // PER_WORD)
                w_mask = n_mask[:, None] & (offs_w < tl.cdiv(K, PER_WORD))[None, :]
                words = tl.load(w_ptr + rows_w[:, None] * stride_wn + offs_w[None, :] * stride_wk, mask=w_mask, other=0)
                shifts = tl.arange(0, PER_WORD) * BITS
                codes = (words[:, :, None] >> shifts[None, None, :]) & ((1 << BITS) - 1)
                codes = tl.reshape(codes, (BLOCK_N, BLOCK_K))
            g = k0 // GROUP
            s = tl.load(s_ptr + (offs_n // SCALE_BLOCK_N) * stride_sn + g * stride_sg, mask=n_mask, other=0.0)
            s = s.to(tl.float32)
            if A_FP8:
                if W_FP8:
                    wq = w
                else:
                    wq = (codes - (1 << (BITS - 1))).to(tl.float16).to(x.dtype)
                part = _dot(x, tl.trans(wq), UPCAST)
                xs = tl.load(xs_ptr + offs_m * stride_xsm + k0 // X_GROUP, mask=m_mask, other=0.0)
                acc += part * xs[:, None] * s[None, :]
            else:
                if W_FP8:
                    wf = w.to(tl.float32) * s[:, None]
                else:
                    if HAS_ZERO:
                        z = tl.load(z_ptr + offs_n * stride_zn + g * stride_zg, mask=n_mask, other=0.0).to(tl.float32)
                        wf = (codes.to(tl.float32) - z[:, None]) * s[:, None]
                    else:
                        wf = (codes - (1 << (BITS - 1))).to(tl.float32) * s[:, None]
                acc += _dot(x, tl.trans(wf.to(x.dtype)), UPCAST)
        out_mask = m_mask[:, None] & n_mask[None, :]
        dst = out_ptr + pid_k * stride_os + offs_m[:, None] * stride_om + offs_n[None, :]
        if SPLIT:
            tl.store(dst, acc, mask=out_mask)
        else:
            tl.store(dst, acc.to(out_ptr.dtype.element_ty), mask=out_mask)

    @triton.jit
    def _gemv_tile(w_tile, s_tile, z_tile, word, end, n_mask, stride_wk, stride_sg, stride_zg, PER_WORD: tl.constexpr,
                   GROUP: tl.constexpr, HAS_ZERO: tl.constexpr):  # fmt: skip
        """Words [rows, BLOCK_N] of input-word rows `word` (those at or past `end` read as 0), with the scales and
        zero points (the scales again without zero points) of their groups, in float32."""
        mask = (word < end)[:, None] & n_mask[None, :]
        g = (word * PER_WORD) // GROUP
        words = tl.load(w_tile + word[:, None] * stride_wk, mask=mask, other=0)
        s = tl.load(s_tile + g[:, None] * stride_sg, mask=mask, other=0.0).to(tl.float32)
        z = s
        if HAS_ZERO:
            z = tl.load(z_tile + g[:, None] * stride_zg, mask=mask, other=0.0).to(tl.float32)
        return words, s, z

    @triton.jit
    def _gemv_tile_sum(words, s, z, word, x_ptr, m, stride_xm, K, magic, BITS: tl.constexpr, HAS_ZERO: tl.constexpr,
                       EVEN_K: tl.constexpr, X_PACKED: tl.constexpr):  # fmt: skip
        """One tile's products [WORDS, BLOCK_N]: the codes of words (input-word rows `word`) times the token's
        activations, with their groups' scales s and zero points z."""
        PER_WORD: tl.constexpr = 32 // BITS
        CODE_MASK: tl.constexpr = (1 << BITS) - 1
        # Codes become floats without conversion instructions: a code masked in place at mantissa bit p, under
        # the exponent of 2**(23 - p), reads as 2**(23 - p) + code. Bits FIRST to 22 hold RUN codes at a time (one
        # shift of the word per run). Once the row's sum of those powers times x (`bias`) is taken off, the
        # products' rounding costs about 2**(-1 - FIRST) of a code step each: bits 11-22 take three 4-bit or six
        # 2-bit codes per shift for about 3e-5 (4-bit) and 1.5e-4 (2-bit) of the sum, below the bf16 output's
        # rounding; 8-bit codes take one per shift from bit 15 either way (about 1e-6).
        FIRST: tl.constexpr = 11 if BITS < 8 else 15
        RUN: tl.constexpr = (23 - BITS - FIRST) // BITS + 1
        # sum_j (2**(23 - p_j) + code_j) * x_j per word; the row's sum_j (2**(23 - p_j) + zero) * x_j
        # (`bias`, the symmetric grid's zero included) is subtracted once per word. `magic` (the exponent
        # bits of 2**8) comes as an argument, so it and the exponents below it sit in registers and each
        # mask goes in its instruction: one LOP3 and one FFMA per code. Zero points per group and column
        # take zero * sum_j x_j once per word instead.
        for j in tl.static_range(PER_WORD):
            k = word * PER_WORD + j
            if X_PACKED:  # bf16 activations four to a 64-bit load; each widened by one shift or mask
                if j % 4 == 0:
                    quad_index = k // 4
                    if EVEN_K:
                        quad = tl.load(x_ptr + m * stride_xm + quad_index)
                    else:
                        quad = tl.load(x_ptr + m * stride_xm + quad_index, mask=quad_index < K // 4, other=0)
                    pair = quad.to(tl.int32)
                if j % 4 == 2:
                    pair = (quad >> 32).to(tl.int32)
                xj = (pair << 16 if j % 2 == 0 else pair & -65536).to(tl.float32, bitcast=True)
            elif EVEN_K:
                xj = tl.load(x_ptr + m * stride_xm + k).to(tl.float32)
            else:
                xj = tl.load(x_ptr + m * stride_xm + k, mask=k < K, other=0.0).to(tl.float32)
            i = j % RUN  # place in its run; the run's shift is the same expression for each of its codes
            shift = FIRST - BITS * (j - i)
            run = words << shift if shift >= 0 else words >> -shift
            field = (run & (CODE_MASK << (FIRST + BITS * i))) | (magic - ((FIRST - 15 + BITS * i) << 23))
            power = 1 << (23 - FIRST - BITS * i)
            if not HAS_ZERO:
                power += 1 << (BITS - 1)
            if j == 0:  # the first term starts the sums (no zeroed registers per tile)
                cx = field.to(tl.float32, bitcast=True) * xj[:, None]
                bias = power * xj
                sx = xj
            else:
                cx += field.to(tl.float32, bitcast=True) * xj[:, None]
                bias += power * xj
                sx += xj
        cx -= bias[:, None]
        if HAS_ZERO:
            return s * (cx - z * sx[:, None])
        return s * cx

    @triton.jit
    def _gemv_epilogue(y, m, offs_n, n_mask, K, out_ptr, stride_om, sq_in_ptr, eps, res_ptr, stride_rm, gain_ptr,
                       normed_ptr, sq_out_ptr, ROW_SCALE: tl.constexpr, RES_NORM: tl.constexpr,
                       GATED: tl.constexpr):  # fmt: skip
        """Finish the outputs `offs_n` of token m from the tile's sums y. ROW_SCALE: the input was an RMSNorm's
        h * gain, unnormalised, so the sums take its 1 / rms (from the sum of squares the kernel before left in
        sq_in). GATED: y holds gate columns, then the matching up columns; the outputs are silu(gate) * up.
        RES_NORM: the outputs plus the residual are the new residual stream h (stored), and the next RMSNorm is
        prepared: h * gain stored to `normed`, sum(h**2) added to sq_out."""
        out_ty = out_ptr.dtype.element_ty
        if ROW_SCALE:
            y = y * tl.rsqrt(tl.load(sq_in_ptr + m) / K + eps)
        if GATED:
            gate, up = tl.split(tl.trans(tl.reshape(y, (2, y.shape[0] // 2))))
            y = gate * tl.sigmoid(gate) * up
        if RES_NORM:
            # Rounded as the separate kernels round: the projection's output, then the residual sum.
            res = tl.load(res_ptr + m * stride_rm + offs_n, mask=n_mask, other=0.0).to(tl.float32)
            h = (y.to(out_ty).to(tl.float32) + res).to(out_ty).to(tl.float32)
            gain = tl.load(gain_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)
            tl.store(normed_ptr + m * stride_om + offs_n, (h * gain).to(out_ty), mask=n_mask)
            tl.atomic_add(sq_out_ptr + m, tl.sum(tl.where(n_mask, h * h, 0.0), axis=0), sem="relaxed")
            y = h
        tl.store(out_ptr + m * stride_om + offs_n, y.to(out_ty), mask=n_mask)

    @triton.jit
    def _int_gemv_kernel(
        x_ptr,
        w_ptr,
        s_ptr,
        z_ptr,
        xs_ptr,
        part_ptr,
        count_ptr,
        out_ptr,
        sq_in_ptr,
        res_ptr,
        gain_ptr,
        normed_ptr,
        sq_out_ptr,
        M,
        N,
        K,
        k_per_split,
        num_splits,
        magic,
        eps,
        stride_xm,
        stride_wn,
        stride_wk,
        stride_sn,
        stride_sg,
        stride_zn,
        stride_zg,
        stride_xsm,
        stride_om,
        stride_rm,
        BITS: tl.constexpr,
        HAS_ZERO: tl.constexpr,
        A_SCALE: tl.constexpr,
        GROUP: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
        SPLIT: tl.constexpr,
        EVEN_K: tl.constexpr,
        PREFETCH: tl.constexpr,
        X_PACKED: tl.constexpr,
        ROW_SCALE: tl.constexpr,
        RES_NORM: tl.constexpr,
        GATED: tl.constexpr,
        STAGES: tl.constexpr,
        USE_PDL: tl.constexpr,
    ):
        """One token (program axis 0) times BLOCK_N weight columns over one K slice of input-major words. GATED:
        the weight has 2N columns, [gate | up], and the tile takes BLOCK_N / 2 of each half (N outputs)."""
        m = tl.program_id(0)
        pid_n = tl.program_id(1)
        pid_k = tl.program_id(2)
        PER_WORD: tl.constexpr = 32 // BITS
        WORDS: tl.constexpr = BLOCK_K // PER_WORD
        if GATED:  # the gate columns of BLOCK_N / 2 outputs, then their up columns, N further on
            offs_out = pid_n * (BLOCK_N // 2) + tl.arange(0, BLOCK_N // 2)
            lane = tl.arange(0, BLOCK_N)
            cols = pid_n * (BLOCK_N // 2) + lane % (BLOCK_N // 2)
            offs_n = cols + (lane // (BLOCK_N // 2)) * N
            n_mask = cols < N
            width = 2 * N
        else:
            offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
            n_mask = offs_n < N
            offs_out = offs_n
            width = N
        out_mask = offs_out < N
        rows = tl.arange(0, WORDS)
        # Elementwise partial sums, reduced over K once at the end.
        acc = tl.zeros((WORDS, BLOCK_N), dtype=tl.float32)
        k_lo = pid_k * k_per_split
        k_hi = tl.minimum(k_lo + k_per_split, K)
        end = tl.cdiv(k_hi, PER_WORD)  # words past this row belong to the next slice
        w_tile = w_ptr + offs_n[None, :] * stride_wn
        s_tile = s_ptr + offs_n[None, :] * stride_sn
        z_tile = z_ptr + offs_n[None, :] * stride_zn
        if STAGES > 1:
            # Triton's software pipeline copies the next STAGES - 1 tiles into shared memory while this one is
            # summed: more bytes in flight per SM than registers can hold (and fewer registers, so more programs
            # per SM). It pipelines no loop with a wait inside, so the first copies start after the wait.
            wait_for_previous(USE_PDL)
            for k0 in tl.range(k_lo, k_hi, BLOCK_K, num_stages=STAGES):
                word = k0 // PER_WORD + rows
                words, s, z = _gemv_tile(w_tile, s_tile, z_tile, word, end, n_mask, stride_wk, stride_sg, stride_zg,
                                         PER_WORD, GROUP, HAS_ZERO)  # fmt: skip
                acc += _gemv_tile_sum(words, s, z, word, x_ptr, m, stride_xm, K, magic, BITS, HAS_ZERO, EVEN_K,
                                      X_PACKED)  # fmt: skip
        else:
            words, s, z = _gemv_tile(w_tile, s_tile, z_tile, k_lo // PER_WORD + rows, end, n_mask, stride_wk,
                                     stride_sg, stride_zg, PER_WORD, GROUP, HAS_ZERO)  # fmt: skip
            wait_for_previous(USE_PDL)  # the first tile of weights is on its way; the activations come next
            for k0 in range(k_lo, k_hi, BLOCK_K):
                word = k0 // PER_WORD + rows
                if PREFETCH:  # the next tile's loads go out before this tile's arithmetic
                    next_words, next_s, next_z = _gemv_tile(w_tile, s_tile, z_tile, word + WORDS, end, n_mask,
                                                            stride_wk, stride_sg, stride_zg, PER_WORD, GROUP,
                                                            HAS_ZERO)  # fmt: skip
                acc += _gemv_tile_sum(words, s, z, word, x_ptr, m, stride_xm, K, magic, BITS, HAS_ZERO, EVEN_K,
                                      X_PACKED)  # fmt: skip
                if PREFETCH:
                    words, s, z = next_words, next_s, next_z
                else:
                    words, s, z = _gemv_tile(w_tile, s_tile, z_tile, word + WORDS, end, n_mask, stride_wk, stride_sg,
                                             stride_zg, PER_WORD, GROUP, HAS_ZERO)  # fmt: skip
        y = tl.sum(acc, axis=0)
        if A_SCALE:
            y = y * tl.load(xs_ptr + m * stride_xsm).to(tl.float32)
        if SPLIT:
            # Each slice leaves its partial sums; the last slice of this tile to arrive adds them up in slice
            # order (deterministic) and resets the tile's counter for the next launch.
            tl.store(part_ptr + (pid_k * M + m) * width + offs_n, y, mask=n_mask)
            tl.debug_barrier()
            tile = m * tl.num_programs(1) + pid_n
            arrived = tl.atomic_add(count_ptr + tile, 1, sem="acq_rel", scope="gpu")
            if arrived == num_splits - 1:
                total = tl.zeros((BLOCK_N,), dtype=tl.float32)
                for i in range(num_splits):
                    total += tl.load(part_ptr + (i * M + m) * width + offs_n, mask=n_mask, other=0.0,
                                     cache_modifier=".cg")  # fmt: skip
                _gemv_epilogue(total, m, offs_out, out_mask, K, out_ptr, stride_om, sq_in_ptr, eps, res_ptr, stride_rm,
                               gain_ptr, normed_ptr, sq_out_ptr, ROW_SCALE, RES_NORM, GATED)  # fmt: skip
                tl.atomic_xchg(count_ptr + tile, 0)
        else:
            _gemv_epilogue(y, m, offs_out, out_mask, K, out_ptr, stride_om, sq_in_ptr, eps, res_ptr, stride_rm,
                           gain_ptr, normed_ptr, sq_out_ptr, ROW_SCALE, RES_NORM, GATED)  # fmt: skip


FLOAT_2_POW_8_BITS = 0x43800000
GEMV_MAX_M = 16  # up to this many tokens the GEMM splits K like a GEMV (the weight bytes bound it)
# Up to this many tokens, integer weights of these bits take the CUDA-core GEMV rather than the tensor-core kernel
# (which pads to 16 tokens). H100, results/quant-gemv-2026-11-25*.json: at 4 bits the GEMV wins up to 3 tokens
# and ties at 4, where it is twice as fast with groups of 32 (the tensor-core kernel's K tile shrinks to the
# group); at 8 bits it wins up to 3 tokens and loses at 4. 2-bit codes cost the GEMV what 4-bit codes cost per
# weight, for half the bytes.
FMA_GEMV_MAX_M = {2: 4, 4: 4, 8: 3}


@dataclass(frozen=True)
class GemvConfig:
    """Launch of the integer GEMV: column tile, K tile, K slices (None: enough for `programs_per_sm` programs per
    SM), warps, the K loop's pipeline depth (num_stages > 1: tiles copied ahead through shared memory by Triton's
    software pipeline), and, without it, whether the kernel loads one tile ahead into registers."""

    block_n: int = 32
    block_k: int = 256
    split_k: int | None = None
    num_warps: int = 8
    num_stages: int = 1
    programs_per_sm: int = 2
    prefetch: bool = False  # load the next K tile before the arithmetic of this one (num_stages 1)


# The fastest launch per (bits, group size, N, K), measured on an H100 (benchmarks/quant_gemv.py: Llama-3.1-8B
# and Llama-3.2-1B projections, one token; results/quant-gemv-2026-11-25*.json); W4A8 takes the 4-bit rows.
# Shapes not listed take the default, the best configuration across all of them (6% slower than each shape's best,
# geometric mean).
GEMV_CONFIGS: dict[tuple[int, int, int, int], GemvConfig] = {
    (4, 128, 6144, 4096): GemvConfig(block_k=512, num_warps=4, programs_per_sm=4),
    (4, 128, 4096, 4096): GemvConfig(block_k=512, num_warps=4, programs_per_sm=4),  # results/gemv-ab-2026-12-07
    (4, 128, 28672, 4096): GemvConfig(num_warps=4, programs_per_sm=4),
    (4, 128, 4096, 14336): GemvConfig(block_k=512, num_warps=4, programs_per_sm=4),
    (4, 128, 3072, 2048): GemvConfig(block_n=16, block_k=512, num_warps=4, programs_per_sm=1),
    (4, 128, 2048, 2048): GemvConfig(block_k=512, prefetch=True),
    (4, 128, 16384, 2048): GemvConfig(block_k=512, programs_per_sm=1, prefetch=True),
    (4, 128, 2048, 8192): GemvConfig(block_k=512, prefetch=True),
    (4, 32, 6144, 4096): GemvConfig(block_k=512, prefetch=True),
    (4, 32, 4096, 4096): GemvConfig(block_k=512, prefetch=True),
    (4, 32, 28672, 4096): GemvConfig(block_n=64, prefetch=True),
    (4, 32, 4096, 14336): GemvConfig(block_n=64, programs_per_sm=4, prefetch=True),
    (4, 32, 3072, 2048): GemvConfig(block_n=64, num_warps=4, programs_per_sm=4),
    (4, 32, 2048, 2048): GemvConfig(block_n=16, block_k=512, num_warps=4, programs_per_sm=4, prefetch=True),
    (4, 32, 16384, 2048): GemvConfig(block_k=512, programs_per_sm=1, prefetch=True),
    (4, 32, 2048, 8192): GemvConfig(block_k=512, prefetch=True),
    (8, 128, 6144, 4096): GemvConfig(block_k=512, prefetch=True),
    (8, 128, 4096, 4096): GemvConfig(block_k=512, programs_per_sm=1),
    (8, 128, 28672, 4096): GemvConfig(block_n=64),
    (8, 128, 4096, 14336): GemvConfig(block_k=512, prefetch=True),
    (8, 128, 3072, 2048): GemvConfig(block_n=16, block_k=512, programs_per_sm=1, prefetch=True),
    (8, 128, 2048, 2048): GemvConfig(block_k=512, programs_per_sm=4, prefetch=True),
    (8, 128, 16384, 2048): GemvConfig(programs_per_sm=1, prefetch=True),
    (8, 128, 2048, 8192): GemvConfig(block_k=512),
}


@functools.cache
def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1


def _largest_tile(limit: int, cap: int) -> int:
    """The largest power of two <= cap (>= 16) that divides `limit` (a group size), or cap if the group spans K."""
    tile = cap
    while tile > 16 and limit % tile:
        tile //= 2
    return tile


def int_gemv_supported(w: QuantWeight, x_scale: torch.Tensor | None) -> bool:
    """Integer codes whose words each lie in one group, activations unscaled or scaled per token."""
    per_word = 32 // w.bits
    group_ok = w.group_size >= w.in_features or w.group_size % per_word == 0
    return not w.is_fp8 and group_ok and (x_scale is None or x_scale.shape[1] == 1)


def int_gemv_triton(
    x: torch.Tensor,
    w: QuantWeight,
    x_scale: torch.Tensor | None = None,
    out_dtype: torch.dtype | None = None,
    config: GemvConfig | None = None,
) -> torch.Tensor:
    """quant_gemm_ref's contract for a few tokens of integer weights (int_gemv_supported): a CUDA-core GEMV.
    Input-major weights (QuantWeight.input_major) read best; output-major ones work too."""
    return _int_gemv(x, w, x_scale, out_dtype, config)[0]


def int_gemv_norm_triton(
    x: torch.Tensor,
    w: QuantWeight,
    norm_in: NormIn | None = None,
    norm_out: NormOut | None = None,
    config: GemvConfig | None = None,
    gated: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """int_gemv_norm_ref's contract: the GEMV with the halves of the RMSNorms around it (or a gated MLP's
    activation) in its epilogue."""
    return _int_gemv(x, w, None, None, config, norm_in, norm_out, gated)


def _int_gemv(
    x: torch.Tensor,
    w: QuantWeight,
    x_scale: torch.Tensor | None,
    out_dtype: torch.dtype | None,
    config: GemvConfig | None,
    norm_in: NormIn | None = None,
    norm_out: NormOut | None = None,
    gated: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    m, k = x.shape
    assert not gated or (norm_out is None and w.out_features % 2 == 0)
    n = w.out_features // 2 if gated else w.out_features  # outputs
    out_dtype = out_dtype or (torch.bfloat16 if x_scale is not None else x.dtype)
    out = torch.empty((m, n), dtype=out_dtype, device=x.device)
    normed = torch.empty_like(out) if norm_out is not None else None
    if m == 0:
        return out, normed
    assert x.stride(-1) == 1 and k == w.in_features and int_gemv_supported(w, x_scale)
    group = min(w.group_size, k)
    cfg = config or GEMV_CONFIGS.get((w.bits, group, w.out_features, k), GemvConfig())
    n_blocks = triton.cdiv(n, cfg.block_n // 2 if gated else cfg.block_n)
    k_tiles = triton.cdiv(k, cfg.block_k)
    split = cfg.split_k or triton.cdiv(cfg.programs_per_sm * _sm_count(x.device), m * n_blocks)
    tiles_per_split = triton.cdiv(k_tiles, max(1, min(split, k_tiles)))
    split = triton.cdiv(k_tiles, tiles_per_split)
    partial, counters = out, w.counters
    if split > 1:
        partial = torch.empty((split, m, w.out_features), dtype=torch.float32, device=x.device)
        if counters is None or counters.numel() < m * n_blocks:
            counters = torch.zeros(m * n_blocks, dtype=torch.int32, device=x.device)
    zeros = w.zeros if w.zeros is not None else w.scales
    xs = x_scale if x_scale is not None else w.scales
    # bf16 rows read as 64-bit words (a quarter of the load instructions) when their layout allows.
    packed = x.dtype == torch.bfloat16 and k % 4 == 0 and x.stride(0) % 4 == 0 and x.data_ptr() % 8 == 0
    x_arg, stride_xm = (x.view(torch.int64), x.stride(0) // 4) if packed else (x, x.stride(0))
    sq_in = norm_in.sumsq if norm_in is not None else partial  # unread placeholders where a flag is off
    residual = norm_out.residual if norm_out is not None else out
    assert residual.stride(-1) == 1
    gain, sq_out = (norm_out.gain, norm_out.sumsq) if norm_out is not None else (out, partial)
    _int_gemv_kernel[(m, n_blocks, split)](
        x_arg, w.qweight, w.scales, zeros, xs, partial, counters if split > 1 else out, out,
        sq_in, residual, gain, normed if normed is not None else out, sq_out, m, n, k,
        tiles_per_split * cfg.block_k, split, FLOAT_2_POW_8_BITS, norm_in.eps if norm_in is not None else 0.0,
        stride_xm, *w.qweight.stride(), *w.scales.stride(), *zeros.stride(), xs.stride(0), out.stride(0),
        residual.stride(0), BITS=w.bits, HAS_ZERO=w.zeros is not None, A_SCALE=x_scale is not None, GROUP=group,
        BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, SPLIT=split > 1, EVEN_K=k % cfg.block_k == 0,
        PREFETCH=cfg.prefetch, X_PACKED=packed, ROW_SCALE=norm_in is not None, RES_NORM=norm_out is not None,
        GATED=gated, STAGES=cfg.num_stages, num_warps=cfg.num_warps, num_stages=cfg.num_stages, **pdl_options(x.device),
    )  # fmt: skip
    return out, normed


def quant_gemm_triton(
    x: torch.Tensor,
    w: QuantWeight,
    x_scale: torch.Tensor | None = None,
    out_dtype: torch.dtype | None = None,
    *,
    block_m: int | None = None,
    block_n: int | None = None,
    block_k: int | None = None,
    split_k: int | None = None,
) -> torch.Tensor:
    """quant_gemm_ref's contract; block sizes and the split count override the heuristics (tests, tuning) and
    keep the tensor-core kernel, which otherwise leaves a few tokens of integer weights (FMA_GEMV_MAX_M) to
    int_gemv_triton."""
    m, k = x.shape
    overridden = any(v is not None for v in (block_m, block_n, block_k, split_k))
    if 0 < m <= FMA_GEMV_MAX_M.get(w.bits, 0) and not overridden and int_gemv_supported(w, x_scale):
        return int_gemv_triton(x, w, x_scale, out_dtype)
    n = w.out_features
    out_dtype = out_dtype or (torch.bfloat16 if x_scale is not None else x.dtype)
    out = torch.empty((m, n), dtype=out_dtype, device=x.device)
    if m == 0:
        return out
    assert x.stride(-1) == 1 and k == w.in_features
    # A K tile must stay inside one weight group (and one activation group in A8).
    limits = [w.group_size] if w.group_size < k else []
    x_group = k
    if x_scale is not None:
        x_group = triton.cdiv(k, x_scale.shape[1])
        if x_group < k:
            limits.append(x_group)
    gemv = m <= GEMV_MAX_M
    cap = block_k or (128 if gemv else 64)
    for limit in limits:
        cap = _largest_tile(limit, cap)
    block_k = cap
    if gemv:
        block_m, block_n = block_m or 16, block_n or 64
    else:
        block_m, block_n = block_m or (64 if m <= 64 else 128), block_n or 128
    grid_mn = triton.cdiv(m, block_m) * triton.cdiv(n, block_n)
    k_tiles = triton.cdiv(k, block_k)
    if split_k is None:
        split_k = min(k_tiles, max(1, triton.cdiv(2 * _sm_count(x.device), grid_mn))) if gemv else 1
    k_per_split = triton.cdiv(k_tiles, split_k) * block_k
    split_k = triton.cdiv(k, k_per_split)
    target = torch.empty((split_k, m, n), dtype=torch.float32, device=x.device) if split_k > 1 else out
    zeros = w.zeros if w.zeros is not None else w.scales
    xs = x_scale if x_scale is not None else w.scales
    _quant_gemm_kernel[(triton.cdiv(m, block_m), triton.cdiv(n, block_n), split_k)](
        x, w.qweight, w.scales, zeros, xs, target, m, n, k, k_per_split,
        x.stride(0), *w.qweight.stride(), *w.scales.stride(), *zeros.stride(), xs.stride(0),
        target.stride(-2), target.stride(0) if split_k > 1 else 0,
        BITS=w.bits, W_FP8=w.is_fp8, A_FP8=x_scale is not None, HAS_ZERO=w.zeros is not None,
        GROUP=min(w.group_size, k), SCALE_BLOCK_N=w.block_n, X_GROUP=x_group,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, SPLIT=split_k > 1, UPCAST=INTERPRETED,
        num_warps=4, num_stages=4 if gemv else 3,
    )  # fmt: skip
    if split_k > 1:
        torch.sum(target, 0, out=out) if out_dtype == torch.float32 else out.copy_(target.sum(0))
    return out


def quant_gemm(
    x: torch.Tensor, w: QuantWeight, x_scale: torch.Tensor | None = None, out_dtype: torch.dtype | None = None
) -> torch.Tensor:
    """quant_gemm_ref's contract: the Triton kernel on CUDA, the reference elsewhere."""
    if use_triton(x):
        return quant_gemm_triton(x, w, x_scale, out_dtype)
    return quant_gemm_ref(x, w, x_scale, out_dtype)


def int_gemv_norm(
    x: torch.Tensor,
    w: QuantWeight,
    norm_in: NormIn | None = None,
    norm_out: NormOut | None = None,
    gated: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """int_gemv_norm_ref's contract: the Triton GEMV on CUDA, the reference elsewhere."""
    if use_triton(x):
        return int_gemv_norm_triton(x, w, norm_in, norm_out, gated=gated)
    return int_gemv_norm_ref(x, w, norm_in, norm_out, gated)
