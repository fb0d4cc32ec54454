"""AWQ checkpoints in the GEMM layout (AutoAWQ): qweight int32 [K, N / 8] and qzeros int32 [groups, N / 8],
both packed along the output dimension in AWQ's interleaved order (nibble i of a word holds column
AWQ_ORDER[i] of its eight), scales [groups, N]; zero points as stored."""

from __future__ import annotations

import torch

from slimserve.errors import CheckpointError
from slimserve.kernels.quant_gemm_ref import pack_codes, unpack_codes
from slimserve.layers.quantized.int_weight import IntShard, IntWeightLinear

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)


def _unpack_awq(packed: torch.Tensor, cols: int) -> torch.Tensor:
    """[rows, cols / 8] words -> [rows, cols] codes in natural column order."""
    nibbles = unpack_codes(packed, 4, packed.shape[1] * 8).view(packed.shape[0], -1, 8)
    order = torch.tensor(AWQ_ORDER, device=packed.device)
    natural = torch.empty_like(nibbles)
    natural[..., order] = nibbles
    return natural.flatten(1)[:, :cols]


def pack_awq(codes: torch.Tensor) -> torch.Tensor:
    """Inverse of _unpack_awq (natural column order -> AWQ's interleaved words)."""
    rows, cols = codes.shape
    grouped = torch.nn.functional.pad(codes, (0, -cols % 8)).view(rows, -1, 8)
    order = torch.tensor(AWQ_ORDER, device=codes.device)
    return pack_codes(grouped[..., order].flatten(1), 4)


class AWQLinear(IntWeightLinear):
    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        if self.scheme.bits != 4:
            raise CheckpointError(f"AWQ GEMM layout has 4-bit weights, not {self.scheme.bits}")

    def required(self) -> tuple[str, ...]:
        return ("qweight", "qzeros", "scales")

    def shard(self, part: dict[str, torch.Tensor], rows: int) -> IntShard:
        k, groups = self.in_features, self.num_groups
        qweight = self.check_shape("qweight", part["qweight"], (k, -(-rows // 8)))
        qzeros = self.check_shape("qzeros", part["qzeros"], (groups, -(-rows // 8)))
        scales = self.check_shape("scales", part["scales"], (groups, rows)).t()
        zeros = _unpack_awq(qzeros, rows).t().float()
        return IntShard(scales, codes=_unpack_awq(qweight, rows).t().contiguous(), zeros=zeros)

    def dummy_shard(self, rows: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
        k, groups, dev = self.in_features, self.num_groups, self.device
        return {
            "qweight": pack_awq(torch.randint(0, 16, (k, rows), generator=generator, device=dev)),
            "qzeros": pack_awq(torch.randint(0, 16, (groups, rows), generator=generator, device=dev)),
            "scales": (torch.rand(groups, rows, generator=generator, device=dev) * 2e-3 + 1e-3).half(),
        }
