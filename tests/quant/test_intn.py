"""Group-wise INT-N weights: exact bit packing for every width, the grid, RTN round trips."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lorakit.quant.intn import (BITS, IntNWeight, dequantize_grid, minmax_params, pack_codes, round_to_grid,
                                unpack_codes)


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("n", [1, 7, 8, 31, 32, 1000])
def test_pack_unpack_exact(bits, n):
    codes = torch.randint(0, 2**bits, (n,), generator=torch.Generator().manual_seed(n), dtype=torch.uint8)
    packed = pack_codes(codes, bits)
    assert packed.dtype == torch.uint8 and packed.numel() == (n * bits + 7) // 8
    assert torch.equal(unpack_codes(packed, bits, n), codes)


@settings(max_examples=40, deadline=None)
@given(bits=st.sampled_from(BITS), codes=st.lists(st.integers(0, 255), min_size=1, max_size=200))
def test_pack_unpack_property(bits, codes):
    c = torch.tensor([v % 2**bits for v in codes], dtype=torch.uint8)
    assert torch.equal(unpack_codes(pack_codes(c, bits), bits, c.numel()), c)


def test_packing_is_lsb_first_bit_stream():
    # 3-bit codes 5 (101), 3 (011), 7 (111): stream LSB-first 1,0,1, 1,1,0, 1,1,1 -> byte 0b11011101, then 0b1
    assert pack_codes(torch.tensor([5, 3, 7], dtype=torch.uint8), 3).tolist() == [0b11011101, 0b1]


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("group_size", [32, 64, 128])
def test_rtn_grid_and_round_trip(bits, group_size):
    w = torch.randn(16, 256, generator=torch.Generator().manual_seed(bits))
    q = IntNWeight.from_float(w, bits, group_size)
    codes, wq = q.q(), q.dequantize()
    assert int(codes.max()) <= 2**bits - 1
    scale = q.scale.repeat_interleave(group_size, 1)
    offset = q.offset.repeat_interleave(group_size, 1)
    torch.testing.assert_close(wq, scale * codes.float() + offset, rtol=0, atol=0)  # on the grid, exactly
    # each group's min and max are on the grid ends; the error of RTN is at most half a step
    assert ((wq - w).abs() <= scale / 2 + 1e-6).all()
    again = IntNWeight.from_float(wq, bits, group_size)  # quantize(dequantize(q)) reproduces the codes
    assert torch.equal(again.q(), codes)


def test_constant_group_is_exact():
    w = torch.full((2, 32), 0.3)
    q = IntNWeight.from_float(w, 4, 32)
    assert torch.equal(q.dequantize(), w)


def test_offset_shift_moves_group_offsets_only():
    q = IntNWeight.from_float(torch.randn(4, 64), 3, 32)
    codes, scale, before = q.q().clone(), q.scale.clone(), q.dequantize()
    delta = torch.randn(4, 2)
    q.shift_offset_(delta)
    assert torch.equal(q.q(), codes) and torch.equal(q.scale, scale)
    torch.testing.assert_close(q.dequantize(), before + delta.repeat_interleave(32, 1), rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="group-constant"):
        q.shift_offset_(torch.zeros(4, 64))


@pytest.mark.parametrize("kwargs, match", [
    ({"bits": 6}, "bits=6"),
    ({"bits": 4, "group_size": 48}, "group_size=48 does not divide"),
    ({"bits": 4, "group_size": 0}, "group_size=0"),
])
def test_bad_inputs_name_the_value(kwargs, match):
    with pytest.raises(ValueError, match=match):
        IntNWeight.from_float(torch.randn(2, 64), **kwargs)


def test_float_cast_keeps_format_and_state_dict_round_trips(tmp_path):
    from safetensors.torch import load_file, save_file

    q = IntNWeight.from_float(torch.randn(8, 64), 5, 32)
    ref = q.dequantize()
    q.to(torch.bfloat16)
    assert q.scale.dtype == torch.float32 and q.dequantize().dtype == torch.bfloat16
    save_file(q.state_dict(), str(tmp_path / "w.safetensors"))
    fresh = IntNWeight(8, 64, 5, 32)
    fresh.load_state_dict(load_file(str(tmp_path / "w.safetensors")))
    assert torch.equal(fresh.dequantize(torch.float32), ref)


def test_minmax_matches_round_to_grid_extremes():
    w = torch.randn(3, 64)
    scale, offset = minmax_params(w, 4, 32)
    q = round_to_grid(w, scale, offset, 4).view(3, 2, 32)
    assert (q.amin(-1) == 0).all() and (q.amax(-1) == 15).all()


@pytest.mark.parametrize("bits", BITS)
def test_dequantize_in_any_dtype_is_the_grid_rounded_once(bits):
    # 4 bits gathers codes as floats and writes bf16/fp16 in the add itself: bit-identical to the grid, then .to
    q = IntNWeight.from_float(torch.randn(24, 96, generator=torch.Generator().manual_seed(bits)), bits, 32)
    moved = torch.randn(q.scale.shape, generator=torch.Generator().manual_seed(7)) * 0.01
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        for m in (None, moved):
            grid = dequantize_grid(q.q(), q.scale, q.offset if m is None else q.offset + m)
            out = q.dequantize(dtype, m)
            assert out.dtype == dtype and out.shape == (24, 96)
            assert torch.equal(out, grid.to(dtype)), (dtype, m is None)


@pytest.mark.parametrize("bits", BITS)
def test_large_weights_dequantize_in_pieces_to_the_same_values(monkeypatch, bits):
    # a weight over 2 x CHUNK elements is dequantized in row pieces (bf16/fp16 on a CPU): pieces are made
    # small here so a small weight takes that path; 40 rows of 96 = 3840 elements, pieces of 2 rows
    import lorakit.quant.blockwise as blockwise

    q = IntNWeight.from_float(torch.randn(40, 96, generator=torch.Generator().manual_seed(bits)), bits, 32)
    moved = torch.randn(q.scale.shape, generator=torch.Generator().manual_seed(3)) * 0.01
    expected = {(dtype, m is None): q.dequantize(dtype, m) for dtype in (torch.bfloat16, torch.float16)
                for m in (None, moved)}
    monkeypatch.setattr(blockwise, "CHUNK", 200)
    assert blockwise.chunked(q.shape.numel(), q.codes.device)
    for (dtype, plain), before in expected.items():
        assert torch.equal(q.dequantize(dtype, None if plain else moved), before)
