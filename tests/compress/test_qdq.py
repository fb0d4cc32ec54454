"""The number grids on small hand-worked cases, and the packing layout against compressed-tensors."""

import pytest
import torch
from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32, unpack_from_int32

from slimserve.compress.args import QuantArgs
from slimserve.compress.errors import QuantConfigError
from slimserve.compress.quant import qdq
from slimserve.compress.quant.packing import pack_int32, unpack_int32
from slimserve.compress.quant.rtn import rtn


def test_rtn_symmetric_int4_row():
    w = torch.tensor([[0.13, -0.45, 0.62, 1.4]])
    args = QuantArgs(4, "int", True, "channel")
    q = rtn(w, args, torch.float32)
    # scale = absmax / 7 = 0.2; w / scale = 0.65, -2.25, 3.1, 7.
    assert q.scale.item() == pytest.approx(0.2)
    assert q.zero_point is None
    assert q.q.tolist() == [[1, -2, 3, 7]]
    assert torch.allclose(q.dequantize(args), torch.tensor([[0.2, -0.4, 0.6, 1.4]]))


def test_rtn_asymmetric_int4_row_zero_point():
    w = torch.tensor([[-1.0, 0.0, 1.25, 2.0]])
    args = QuantArgs(4, "int", False, "channel")
    q = rtn(w, args, torch.float32)
    # scale = (2 - -1) / 15 = 0.2; zero point = round(-8 - (-1) / 0.2) = -3; codes round(w / 0.2) - 3.
    assert q.scale.item() == pytest.approx(0.2)
    assert q.zero_point.tolist() == [[-3]]
    assert q.q.tolist() == [[-8, -3, 3, 7]]
    assert torch.allclose(q.dequantize(args), torch.tensor([[-1.0, 0.0, 1.2, 2.0]]))


def test_zero_is_exact_and_all_zero_rows_survive():
    w = torch.tensor([[0.0, 0.0, 0.0, 0.0], [0.5, 1.0, 2.0, 4.0]])
    for sym in (True, False):
        args = QuantArgs(4, "int", sym, "channel")
        deq = rtn(w, args, torch.float32).dequantize(args)
        assert torch.equal(deq[0], torch.zeros(4))


def test_groups_have_independent_scales():
    w = torch.cat([torch.full((2, 4), 0.1), torch.full((2, 4), 10.0)], dim=1)
    args = QuantArgs(4, "int", True, "group", group_size=4)
    q = rtn(w, args, torch.float32)
    assert q.scale.shape == (2, 2)
    assert torch.allclose(q.dequantize(args), w)


def test_fp8_channel_maps_absmax_to_448():
    w = torch.randn(8, 32)
    args = QuantArgs(8, "float", True, "channel")
    q = rtn(w, args, torch.float32)
    assert q.q.dtype == torch.float8_e4m3fn
    assert torch.allclose(q.q.float().abs().amax(1), torch.full((8,), 448.0))
    assert (q.dequantize(args) - w).abs().max() <= w.abs().max() / 16


def test_fp8_blocks_pad_partial_blocks():
    w = torch.randn(130, 200)
    args = QuantArgs(8, "float", True, "block", block_structure=(128, 128))
    q = rtn(w, args, torch.float32)
    assert q.scale.shape == (2, 2)
    assert q.q.shape == w.shape
    assert torch.allclose(q.scale[1, 1], w[128:, 128:].abs().max() / 448)


def test_dynamic_token_activation_int8():
    x = torch.tensor([[[1.0, -2.0, 0.5], [0.0, 0.0, 0.0]]])
    args = QuantArgs(8, "int", True, "token", dynamic=True)
    out = qdq.fake_quantize_activation(x, args)
    scale = 2.0 / 127.5  # the run-time convention: absmax / ((qmax - qmin) / 2)
    expected = torch.round(torch.tensor([1.0, -2.0, 0.5]) / scale).clamp(-128, 127) * scale
    assert torch.allclose(out[0, 0], expected)
    assert torch.equal(out[0, 1], torch.zeros(3))


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("dim", [0, 1])
def test_packing_matches_compressed_tensors(bits, dim):
    q = torch.randint(-(2 ** (bits - 1)), 2 ** (bits - 1), (37, 70), dtype=torch.int8)
    ours = pack_int32(q, bits, dim)
    assert torch.equal(ours, pack_to_int32(q, bits, packed_dim=dim))
    assert torch.equal(unpack_int32(ours, bits, q.shape[dim], dim), q)
    assert torch.equal(unpack_from_int32(ours, bits, q.shape, packed_dim=dim), q)


def test_pack_known_word():
    # Codes 0..7 offset by 8 are nibbles 8..15, the first in the lowest bits.
    q = torch.arange(8, dtype=torch.int8).unsqueeze(0)
    word = pack_int32(q, 4)
    assert word.item() == 0xFEDCBA98 - 2**32


@pytest.mark.parametrize(
    "kw",
    [
        dict(num_bits=5),
        dict(type="float", num_bits=4),
        dict(strategy="group"),
        dict(strategy="token"),
        dict(strategy="diagonal"),
    ],
)
def test_bad_args_raise(kw):
    with pytest.raises(QuantConfigError):
        QuantArgs(**kw)


def test_dequantized_once_caches_inside_the_block_only():
    from torch import nn

    from slimserve.compress.modules import QuantizedLinear, dequantized_once
    from slimserve.compress.quant.rtn import rtn

    torch.manual_seed(0)
    w = torch.randn(8, 64)
    args = QuantArgs(4, "int", False, "group", 32)
    qw = rtn(w, args, torch.float32)
    lin = QuantizedLinear(qw.q, qw.scale, qw.zero_point, None, args, None, "pack-quantized")
    model = nn.Sequential(lin)
    x = torch.randn(3, 64)
    plain = model(x)
    with dequantized_once(model):
        assert torch.equal(lin.cached_weight, lin.dequantized_weight())
        assert torch.equal(model(x), plain)
    assert lin.cached_weight is None
    assert "cached_weight" not in dict(lin.named_buffers())  # never part of the checkpoint
