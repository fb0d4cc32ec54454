"""GPTQ checkpoints (AutoGPTQ / GPTQModel / optimum): qweight int32 [K / (32/bits), N] packed along the
input dimension, qzeros int32 [groups, N / (32/bits)] packed along the output dimension, scales [groups, N],
g_idx [K] (the group of each input column; not in input order with act-order, desc_act). Version 1 of the
format stores every zero point minus one."""

from __future__ import annotations

import torch

from slimserve.kernels.quant_gemm_ref import pack_codes, unpack_codes
from slimserve.layers.quantized.int_weight import IntShard, IntWeightLinear


class GPTQLinear(IntWeightLinear):
    def required(self) -> tuple[str, ...]:
        return ("qweight", "qzeros", "scales")

    def optional(self) -> tuple[str, ...]:
        return ("g_idx",)

    def shard(self, part: dict[str, torch.Tensor], rows: int) -> IntShard:
        bits, k, groups = self.scheme.bits, self.in_features, self.num_groups
        per_word = 32 // bits
        qweight = self.check_shape("qweight", part["qweight"], (-(-k // per_word), rows))
        codes = unpack_codes(qweight.t().contiguous(), bits, k)  # [rows, K]
        qzeros = self.check_shape("qzeros", part["qzeros"], (groups, -(-rows // per_word)))
        zeros = unpack_codes(qzeros, bits, rows).t().float()
        if self.scheme.zero_plus_one:
            zeros = zeros + 1
        scales = self.check_shape("scales", part["scales"], (groups, rows)).t()
        g_idx = part.get("g_idx")
        if g_idx is not None:
            g_idx = self.check_shape("g_idx", g_idx, (k,))
        return IntShard(scales, codes=codes, zeros=zeros, g_idx=g_idx)

    def dummy_shard(self, rows: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
        bits, k, groups, dev = self.scheme.bits, self.in_features, self.num_groups, self.device
        codes = torch.randint(0, 1 << bits, (k, rows), generator=generator, device=dev)
        zeros = torch.randint(0, (1 << bits) - 1, (groups, rows), generator=generator, device=dev)
        return {
            "qweight": pack_codes(codes.t(), bits).t().contiguous(),
            "qzeros": pack_codes(zeros, bits),
            "scales": (torch.rand(groups, rows, generator=generator, device=dev) * 2e-3 + 1e-3).half(),
            "g_idx": (torch.arange(k, device=dev) // self.group_size).int(),
        }
