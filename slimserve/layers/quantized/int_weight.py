"""The shared half of the integer weight-only layers (compressed-tensors, GPTQ, AWQ): each checkpoint layout
is converted per shard into unsigned codes, scales and zero points, which `build` stacks into one
QuantWeight (codes packed along the input dimension) for the W2A16/W4A16/W8A16 kernels, stored input-major: the
decode GEMV then reads each K step of a column tile as one contiguous run (the checkpoint keeps its layout).
3-bit codes, which straddle int32 words in the checkpoint, are widened to the 4-bit layout at load: the kernels
take whole codes per word, so a 3-bit model runs at 4-bit speed."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from slimserve.compress.quant.packing import pack_int32, unpack_int32
from slimserve.errors import CheckpointError
from slimserve.kernels.quant_gemm import quant_gemm
from slimserve.kernels.quant_gemm_ref import QuantWeight, pack_codes, unpack_codes
from slimserve.layers.quantized.base import Parts, QuantLinearBase


@dataclass
class IntShard:
    """One output shard in the kernel's terms: unsigned codes [rows, K] (or already packed int32 words),
    scales [rows, groups], zero points [rows, groups] in the unsigned domain (None: symmetric), and the
    act-order group index of each input column (None: column k is in group k // group_size)."""

    scales: torch.Tensor
    codes: torch.Tensor | None = None
    packed: torch.Tensor | None = None
    zeros: torch.Tensor | None = None
    g_idx: torch.Tensor | None = None


class IntWeightLinear(QuantLinearBase):
    """Integer weights, full-precision activations (W4A16, W8A16)."""

    def shard(self, part: dict[str, torch.Tensor], rows: int) -> IntShard:
        raise NotImplementedError

    @property
    def group_size(self) -> int:
        return self.scheme.group_size or self.in_features

    @property
    def num_groups(self) -> int:
        return -(-self.in_features // self.group_size)

    @property
    def kernel_bits(self) -> int:
        """Bits per code in the kernels' layout: whole codes per int32 word (2, 4 or 8)."""
        return 4 if self.scheme.bits == 3 else self.scheme.bits

    def _act_order(self, shards: list[IntShard]) -> torch.Tensor | None:
        """The input permutation that makes every group's columns contiguous (None: already in order)."""
        k, g = self.in_features, self.group_size
        in_order = torch.arange(k, device=self.device) // g
        indices = [s.g_idx.to(self.device).long() for s in shards if s.g_idx is not None]
        if not indices or all(torch.equal(i, in_order) for i in indices):
            return None
        if any(not torch.equal(i, indices[0]) for i in indices[1:]):
            raise CheckpointError("act-order shards of one fused layer have different g_idx")
        perm = torch.argsort(indices[0], stable=True)
        if not torch.equal(indices[0][perm], in_order):
            raise CheckpointError(f"g_idx does not give every group {g} columns")
        return perm

    def build(self, parts: Parts) -> None:
        shards = [self.shard(p, rows) for p, rows in zip(parts, self.shard_sizes)]
        bits, k = self.kernel_bits, self.in_features
        # Widening keeps (code - zero): codes and zero points move up by the same offset.
        offset = (1 << (bits - 1)) - (1 << (self.scheme.bits - 1))
        perm = self._act_order(shards)
        packed = []
        for s in shards:
            if s.packed is not None and perm is None and offset == 0:
                packed.append(s.packed.to(torch.int32))
                continue
            codes = s.codes if s.codes is not None else unpack_codes(s.packed, bits, k)
            codes = codes + offset
            packed.append(pack_codes(codes if perm is None else codes[:, perm], bits))
        has_zeros = any(s.zeros is not None for s in shards)
        zeros = None
        if has_zeros:
            mid = float(1 << (bits - 1))
            zeros = torch.cat([s.zeros + offset if s.zeros is not None else torch.full_like(s.scales, mid)
                               for s in shards])  # fmt: skip
            zeros = zeros.to(self.dtype).contiguous()
        self.perm = perm
        self.cpu_int8 = None
        if self.device.type == "cpu" and bits == 8 and zeros is None and self.group_size >= k:
            # PyTorch's CPU kernel for per-channel symmetric INT8 weights: int8 codes [N, K], scales [N].
            codes = unpack_codes(torch.cat(packed), bits, k) - (1 << (bits - 1))
            scales = torch.cat([s.scales for s in shards]).to(self.dtype).reshape(-1)
            self.cpu_int8 = (codes.to(torch.int8).contiguous(), scales.contiguous())
        self.qweight = QuantWeight(
            qweight=torch.cat(packed).contiguous(),
            scales=torch.cat([s.scales for s in shards]).to(self.dtype).contiguous(),
            zeros=zeros,
            bits=bits,
            group_size=self.group_size,
            in_features=k,
            out_features=self.out_features,
            perm=perm,
        ).input_major()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.perm is not None:
            x = x[:, self.perm]
        if self.cpu_int8 is not None and not x.is_cuda:
            return self.add_bias(torch._weight_int8pack_mm(x, *self.cpu_int8))
        return self.add_bias(quant_gemm(x, self.qweight))


class CompressedIntLinear(IntWeightLinear):
    """compressed-tensors integer weights: "pack-quantized" (weight_packed int32 words, signed codes stored
    offset to unsigned) or "int-quantized" (int8 `weight`); weight_scale per channel or group; optional
    weight_zero_point (packed along the output dimension when pack-quantized) and weight_g_idx."""

    def required(self) -> tuple[str, ...]:
        names = ("weight_packed" if self.scheme.packed else "weight", "weight_scale")
        return names + (() if self.scheme.symmetric else ("weight_zero_point",))

    def optional(self) -> tuple[str, ...]:
        return ("weight_shape", "weight_g_idx")

    def shard(self, part: dict[str, torch.Tensor], rows: int) -> IntShard:
        bits, k, groups = self.scheme.bits, self.in_features, self.num_groups
        scales = self.check_shape("weight_scale", part["weight_scale"], (rows, groups))
        offset = 1 << (bits - 1)
        zeros = None
        if "weight_zero_point" in part:
            zp = part["weight_zero_point"]
            if self.scheme.packed:  # densely packed along the output dimension
                words = self.check_shape("weight_zero_point", zp, (-(-rows * bits // 32), groups))
                zp = unpack_int32(words, bits, rows, dim=0).to(torch.int32)
            zeros = self.check_shape("weight_zero_point", zp.to(torch.int32) + offset, (rows, groups)).float()
        g_idx = part.get("weight_g_idx")
        if self.scheme.packed:
            packed = self.check_shape("weight_packed", part["weight_packed"], (rows, -(-k * bits // 32)))
            if 32 % bits:  # codes straddle words: unpacked here, repacked whole by `build`
                return IntShard(scales, codes=unpack_int32(packed, bits, k).to(torch.int32) + offset, zeros=zeros,
                                g_idx=g_idx)  # fmt: skip
            return IntShard(scales, packed=packed, zeros=zeros, g_idx=g_idx)
        codes = self.check_shape("weight", part["weight"], (rows, k)).to(torch.int32) + offset
        return IntShard(scales, codes=codes, zeros=zeros, g_idx=g_idx)

    def dummy_shard(self, rows: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
        bits, k, groups, dev = self.scheme.bits, self.in_features, self.num_groups, self.device
        codes = torch.randint(0, 1 << bits, (rows, k), generator=generator, device=dev)
        scale = torch.rand(rows, groups, generator=generator, device=dev) * 2e-3 + 1e-3
        zp = torch.randint(0, 1 << bits, (rows, groups), generator=generator, device=dev)
        q, zq = codes - (1 << (bits - 1)), zp - (1 << (bits - 1))  # signed, as checkpoints store them
        if self.scheme.packed:
            part = {"weight_packed": pack_int32(q, bits), "weight_scale": scale}
            zp = pack_int32(zq, bits, dim=0)
        else:
            part = {"weight": q.to(torch.int8), "weight_scale": scale}
            zp = zq.to(torch.int8)
        if not self.scheme.symmetric:
            part["weight_zero_point"] = zp
        return part
