"""Block-wise 4-bit weights on their own: layout, round trips, error bounds, storage, input checks."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from lorakit.quant.blockwise import (
    CODES, FP4Weight, Int4Weight, NF4Weight, pack_4bit, unpack_4bit, weight_class,
)

WEIGHTS = [NF4Weight, FP4Weight, Int4Weight]


def gaussian(shape, seed=0, dtype=torch.float32):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


def nibbles(w):
    return unpack_4bit(w.codes)[: w.shape.numel()]


def test_pack_layout_is_high_nibble_first():
    q = torch.tensor([1, 2, 15, 0], dtype=torch.uint8)
    assert pack_4bit(q).tolist() == [0x12, 0xF0]


@settings(deadline=None)
@given(st.lists(st.integers(0, 15), min_size=1, max_size=64).map(lambda v: v + [0] * (len(v) % 2)))
def test_pack_unpack_round_trip(values):
    q = torch.tensor(values, dtype=torch.uint8)
    assert torch.equal(unpack_4bit(pack_4bit(q)), q)


@settings(max_examples=30, deadline=None)
@given(
    cls=st.sampled_from(WEIGHTS),
    out_features=st.integers(1, 9), in_features=st.integers(1, 150),
    block_size=st.sampled_from([2, 6, 32, 64]), double_quant=st.booleans(), seed=st.integers(0, 1000),
)
def test_quantize_dequantize_quantize_is_stable(cls, out_features, in_features, block_size, double_quant, seed):
    """Re-quantizing the dequantized weight picks the same code values (FP4's ±0 compare equal) and, without
    double quantization, the same absmax. (Double quantization re-rounds the absmax around a new mean.)"""
    w = gaussian((out_features, in_features), seed)
    first = cls.from_float(w, block_size=block_size, double_quant=double_quant, double_quant_block_size=4)
    second = cls.from_float(first.dequantize(), block_size=block_size, double_quant=double_quant,
                            double_quant_block_size=4)
    code = CODES[cls.quant_type]
    assert torch.equal(code[nibbles(second).long()], code[nibbles(first).long()])
    if not double_quant:
        assert torch.equal(second.absmax, first.absmax)
        assert torch.equal(second.dequantize(), first.dequantize())


@pytest.mark.parametrize("cls", WEIGHTS)
def test_error_is_at_most_half_a_code_step(cls):
    w = gaussian((24, 100), seed=3)   # 2400 values: 37 full blocks and a partial one
    q = cls.from_float(w, double_quant=False)
    code = CODES[cls.quant_type].sort().values
    half_step = (code[1:] - code[:-1]).max() / 2
    scale = q.absmax.repeat_interleave(64)[: w.numel()].view_as(w)
    assert ((q.dequantize() - w).abs() <= scale * half_step * (1 + 1e-6)).all()


def test_int4_is_symmetric_with_scale_absmax_over_7():
    w = gaussian((8, 64), seed=4)
    q = Int4Weight.from_float(w, double_quant=False)
    levels = nibbles(q).int() - 8
    assert levels.min() >= -7 and levels.max() <= 7
    assert torch.equal(q.dequantize().view(-1), (levels.float() / 7) * q.absmax.repeat_interleave(64))
    assert ((q.dequantize() - w).abs() <= q.absmax.repeat_interleave(64).view_as(w) / 14 * (1 + 1e-6)).all()


def test_nf4_beats_fp4_and_int4_on_gaussian_weights():
    """The QLoRA paper's comparison: on normally distributed weights NF4 has the smallest error."""
    w = gaussian((256, 256), seed=5)
    error = {cls.quant_type: torch.linalg.norm(cls.from_float(w).dequantize() - w) for cls in WEIGHTS}
    assert error["nf4"] < error["fp4"] and error["nf4"] < error["int4"]


def test_bits_per_parameter_576x576():
    w = gaussian((576, 576))
    plain, dq = NF4Weight.from_float(w, double_quant=False), NF4Weight.from_float(w)
    assert plain.bits_per_param == 4.5                                 # 4 + 32/64
    n_blocks = 576 * 576 // 64
    assert dq.nbytes == 576 * 576 // 2 + n_blocks + 4 * -(-n_blocks // 256) + 4
    assert dq.bits_per_param == pytest.approx(4.127, abs=1e-3)         # 4 + 8/64 + 32/(64·256) + ...


@pytest.mark.parametrize("double_quant", [False, True])
def test_buffers_are_documented_and_round_trip_through_safetensors(tmp_path, double_quant):
    w = gaussian((40, 72), dtype=torch.bfloat16)
    q = NF4Weight.from_float(w, double_quant=double_quant)
    buffers = {name: (b.dtype, tuple(b.shape)) for name, b in q.named_buffers()}
    n, blocks = 40 * 72, 45
    expected = {"codes": (torch.uint8, (n // 2,))}
    expected |= ({"absmax_codes": (torch.uint8, (blocks,)), "nested_absmax": (torch.float32, (1,)),
                  "nested_offset": (torch.float32, ())} if double_quant else {"absmax": (torch.float32, (blocks,))})
    assert buffers == expected
    save_file(q.state_dict(), tmp_path / "w.safetensors")
    loaded = NF4Weight((40, 72), torch.bfloat16, double_quant=double_quant)
    loaded.load_state_dict(load_file(tmp_path / "w.safetensors"))
    assert torch.equal(loaded.dequantize(torch.bfloat16), q.dequantize(torch.bfloat16))
    assert loaded.shape == (40, 72) and loaded.dtype == torch.bfloat16


def test_float_casts_keep_the_format_and_change_only_dtype():
    q = NF4Weight.from_float(gaussian((16, 64)))
    before = q.dequantize()
    q.to(torch.bfloat16)
    assert q.dtype == torch.bfloat16
    assert {b.dtype for b in q.buffers()} == {torch.uint8, torch.float32}
    assert torch.equal(q.dequantize(), before)
    assert q.half().dtype == torch.float16 and q.to("cpu").dtype == torch.float16


@pytest.mark.parametrize("shape, double_quant", [((7, 9), False), ((16, 128), False), ((48, 96), True)])
def test_dequantize_dtype_and_shape(shape, double_quant):
    # (7, 9): a partial last block; whole blocks write a bf16/fp16 result in the scaling pass itself
    w = gaussian(shape)
    q = NF4Weight.from_float(w, double_quant=double_quant)
    assert q.shape == torch.Size(shape) and q.dtype == torch.float32
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        out = q.dequantize(dtype)
        assert out.dtype == dtype and out.shape == shape
        assert torch.equal(out, q.dequantize(torch.float32).to(dtype))
    assert f"NF4Weight(shape={shape}" in repr(q) and "bits_per_param" in repr(q)


@pytest.mark.parametrize("block_size", [0, 3, -64, 64.0, True])
def test_bad_block_size_is_a_clear_error(block_size):
    with pytest.raises(ValueError, match=r"block_size=.* must be a positive multiple of 2"):
        NF4Weight.from_float(gaussian((4, 64)), block_size=block_size)
    with pytest.raises(ValueError, match=r"double_quant_block_size=.* must be a positive multiple of 2"):
        NF4Weight.from_float(gaussian((4, 64)), double_quant_block_size=block_size)


def test_bad_weights_are_clear_errors():
    with pytest.raises(ValueError, match=r"2-D \(out_features, in_features\).*got shape \(64,\)"):
        NF4Weight.from_float(gaussian((64,)))
    with pytest.raises(TypeError, match="floating-point tensor, got a torch.int64 tensor"):
        NF4Weight.from_float(torch.ones(4, 4, dtype=torch.long))
    with pytest.raises(ValueError, match=r"quant_type='nf3' is not supported; choose one of \['fp4', 'int4', 'nf4'\]"):
        weight_class("nf3")


@pytest.mark.parametrize("block_size", [64, 96])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_large_weights_dequantize_in_pieces_to_the_same_values(monkeypatch, block_size, dtype):
    # over 2 x CHUNK elements a CPU weight is dequantized CHUNK elements (whole blocks) at a time; pieces are
    # made small here (a partial last piece: 7680 elements in pieces of 640 or 576)
    import lorakit.quant.blockwise as blockwise

    q = NF4Weight.from_float(gaussian((40, 192)), block_size=block_size, double_quant=True)
    before = q.dequantize(dtype)
    monkeypatch.setattr(blockwise, "CHUNK", 600)
    assert blockwise.chunked(q.shape.numel(), q.codes.device)
    assert torch.equal(q.dequantize(dtype), before)
