"""llama.cpp K-quants (Q4_K, Q5_K, Q6_K) as INT-N codes, scales and offsets: exact against gguf.quants.

gguf.quants cannot quantize the K types (it only dequantizes them), so the test tensors are random bytes
with finite fp16 d / dmin fields (every other bit pattern is a valid K-quant), plus super-blocks built
field by field with `pack` below, an independent writer of the byte layouts.
"""

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")

from lorakit.formats.gguf_kquants import K_TYPES, QK_K, KBlocks, decode_k, dequantize_k  # noqa: E402

Q = gguf.GGMLQuantizationType
SHAPES = [(1, 256), (3, 256), (8, 512), (5, 768)]


def fp16_fields(rng, n):
    """n finite fp16 values over the whole range: signs, zeros, subnormals, tiny to 65504."""
    x = rng.standard_normal(n) * np.exp2(rng.uniform(-26, 16, n))
    x = np.clip(x, -65504, 65504).astype(np.float16)
    special = np.array([0.0, -0.0, 2.0**-24, 6.1e-5, 65504.0, -65504.0, 1.0], np.float16)
    x[: min(n, special.size)] = special[: min(n, special.size)]
    return x


def random_k_tensor(qtype, shape, seed=0):
    """Random raw bytes (rows, bytes per row), as GGUFReader gives them, with finite d (and dmin)."""
    rows, cols = shape
    n = K_TYPES[qtype].bytes_per_superblock
    rng = np.random.default_rng(seed)
    raw = rng.integers(0, 256, (rows, cols // QK_K * n), dtype=np.uint8)
    blk = raw.reshape(rows, cols // QK_K, n)
    fields = [slice(208, 210)] if qtype == Q.Q6_K else [slice(0, 2), slice(2, 4)]
    for at in fields:
        blk[..., at] = fp16_fields(rng, rows * (cols // QK_K)).reshape(rows, -1, 1).view(np.uint8)
    return raw


def pack(qtype, codes, sc, d, m=None, dmin=None):
    """One row of super-blocks from its fields: codes (nsb, 256), sc / m (nsb, 8 or 16), d / dmin (nsb,)."""
    codes = np.asarray(codes, np.uint8).reshape(-1, QK_K)
    nsb = codes.shape[0]
    out = np.zeros((nsb, K_TYPES[qtype].bytes_per_superblock), np.uint8)
    d16 = np.asarray(d, np.float16).reshape(nsb, 1).view(np.uint8)
    if qtype == Q.Q6_K:
        for b in range(nsb):
            for w in range(QK_K):
                half, r, lane = w // 128, (w % 128) // 32, w % 32
                q = int(codes[b, w])
                ql_byte = half * 64 + lane + 32 * (r % 2)
                out[b, ql_byte] |= (q & 15) << (4 * (r // 2))
                out[b, 128 + half * 32 + lane] |= (q >> 4) << (2 * r)
        out[:, 192:208] = np.asarray(sc, np.int8).reshape(nsb, 16).view(np.uint8)
        out[:, 208:210] = d16
        return out.reshape(-1)
    sc, m = np.asarray(sc, np.uint8).reshape(nsb, 8), np.asarray(m, np.uint8).reshape(nsb, 8)
    out[:, 0:2] = d16
    out[:, 2:4] = np.asarray(dmin, np.float16).reshape(nsb, 1).view(np.uint8)
    for i in range(4):  # 6-bit scales/mins 0..3 whole; 4..7 split as low nibble + top two bits
        out[:, 4 + i] = sc[:, i] | (sc[:, i + 4] >> 4) << 6
        out[:, 8 + i] = m[:, i] | (m[:, i + 4] >> 4) << 6
        out[:, 12 + i] = (sc[:, i + 4] & 15) | (m[:, i + 4] & 15) << 4
    for b in range(nsb):
        for w in range(QK_K):
            sub, lane = w // 32, w % 32
            q = int(codes[b, w])
            out[b, -128 + 32 * (sub // 2) + lane] |= (q & 15) << (4 * (sub % 2))
            if qtype == Q.Q5_K:
                out[b, 16 + lane] |= (q >> 4) << sub
    return out.reshape(-1)


def ulp_distance(a, b):
    """Max distance in float32 steps, +0.0 and −0.0 counting as the same value."""
    def ordered(x):
        i = x.view(np.int32).astype(np.int64)
        return np.where(i < 0, -(i & 0x7FFFFFFF), i)
    return int(np.abs(ordered(a) - ordered(b)).max())


def reference(raw, qtype, shape):
    return gguf.quants.dequantize(raw, qtype).reshape(shape)


@pytest.mark.parametrize("qtype", list(K_TYPES), ids=lambda t: t.name)
def test_table_matches_gguf(qtype):
    assert gguf.GGML_QUANT_SIZES[qtype] == (QK_K, K_TYPES[qtype].bytes_per_superblock)
    assert K_TYPES[qtype].bits in {2, 3, 4, 5, 8}  # what lorakit's INT-N accepts


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("qtype", [Q.Q4_K, Q.Q5_K], ids=lambda t: t.name)
def test_q4_k_q5_k_bit_exact(qtype, shape):
    raw = random_k_tensor(qtype, shape, seed=sum(shape))
    kb = decode_k(raw, qtype, shape)
    t = K_TYPES[qtype]
    rows, cols = shape
    assert (kb.bits, kb.group_size) == (t.bits, t.group_size) == (t.bits, 32)
    assert kb.codes.dtype == np.uint8 and kb.codes.shape == shape and int(kb.codes.max()) == 2**t.bits - 1
    for a in (kb.scale, kb.offset):
        assert a.dtype == np.float32 and a.shape == (rows, cols // 32)
    c = kb.codes.reshape(rows, -1, kb.group_size).astype(np.float32)
    ours = (kb.scale[..., None] * c + kb.offset[..., None]).reshape(shape)
    ref = reference(raw, qtype, shape)
    assert np.array_equal(ours, ref)
    assert np.array_equal(ours.view(np.uint32), ref.view(np.uint32))
    assert np.array_equal(dequantize_k(kb).view(np.uint32), ref.view(np.uint32))


@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_q6_k_equal_values_differ_only_in_sign_of_zero(shape):
    raw = random_k_tensor(Q.Q6_K, shape, seed=sum(shape))
    kb = decode_k(raw, Q.Q6_K, shape)
    rows, cols = shape
    assert (kb.bits, kb.group_size) == (8, 16)
    assert kb.codes.shape == shape and int(kb.codes.max()) == 63
    assert kb.scale.dtype == kb.offset.dtype == np.float32 and kb.scale.shape == kb.offset.shape == (rows, cols // 16)
    assert np.array_equal(kb.offset, np.float32(-32) * kb.scale)
    ours, ref = dequantize_k(kb), reference(raw, Q.Q6_K, shape)
    assert np.array_equal(ours, ref)  # the documented bound: max abs difference 0 …
    assert float(np.abs(ours - ref).max()) == 0.0 and ulp_distance(ours, ref) == 0  # … and 0 ulp
    differ = ours.view(np.uint32) != ref.view(np.uint32)
    assert np.all(ref[differ] == 0) and np.all(np.signbit(ref[differ])) and not np.signbit(ours[ours == 0]).any()
    assert np.array_equal(ours.view(np.uint32), (ref + np.float32(0)).view(np.uint32))  # −0.0 → +0.0


def test_q6_k_negative_zero_occurs():
    """The sign-of-zero difference is real, not hypothetical: q = 32 under a negative int8 scale."""
    codes = np.full(QK_K, 32, np.uint8)
    raw = pack(Q.Q6_K, codes, sc=[-3] * 16, d=0.5)
    ref = reference(raw, Q.Q6_K, (1, QK_K))
    ours = dequantize_k(decode_k(raw, Q.Q6_K, (1, QK_K)))
    assert np.all(ref == 0) and np.all(np.signbit(ref))
    assert np.all(ours == 0) and not np.signbit(ours).any()


@pytest.mark.parametrize("qtype", list(K_TYPES), ids=lambda t: t.name)
def test_decode_inverts_pack(qtype):
    """Codes and per-group scale/offset come back exactly from independently packed bytes (2 super-blocks)."""
    rng = np.random.default_rng(7)
    t = K_TYPES[qtype]
    top = 63 if qtype == Q.Q6_K else 2**t.bits - 1
    codes = rng.integers(0, top + 1, 2 * QK_K, dtype=np.uint8)
    ngroups = QK_K // t.group_size
    d = np.array([0.75, -2.0**-20], np.float16)
    if qtype == Q.Q6_K:
        sc = rng.integers(-128, 128, (2, ngroups)).astype(np.int8)
        raw = pack(qtype, codes, sc, d)
        scale = (d.astype(np.float32)[:, None] * sc.astype(np.float32)).reshape(1, -1)
        offset = -32 * scale
    else:
        sc, m = rng.integers(0, 64, (2, 2, 8), dtype=np.uint8)
        sc[0, :], m[1, :] = [0, 63, 1, 62, 32, 31, 16, 48], [63, 0, 62, 1, 48, 16, 31, 32]  # every split bit used
        dmin = np.array([1.5, 2.0**-24], np.float16)
        raw = pack(qtype, codes, sc, d, m, dmin)
        scale = (d.astype(np.float32)[:, None] * sc.astype(np.float32)).reshape(1, -1)
        offset = -(dmin.astype(np.float32)[:, None] * m.astype(np.float32)).reshape(1, -1)
    kb = decode_k(raw, qtype, (1, 2 * QK_K))
    assert np.array_equal(kb.codes[0], codes)
    assert np.array_equal(kb.scale, scale) and np.array_equal(kb.offset, offset)
    assert np.array_equal(dequantize_k(kb), reference(raw, qtype, (1, 2 * QK_K)))


@pytest.mark.parametrize("qtype", list(K_TYPES), ids=lambda t: t.name)
def test_constant_and_wide_range_rows(qtype):
    """Row 0: all weights equal. Row 1: fp16 extremes (65504 and 2^-24) for d in neighbouring super-blocks."""
    t = K_TYPES[qtype]
    ngroups = QK_K // t.group_size
    rng = np.random.default_rng(3)
    if qtype == Q.Q6_K:
        const = pack(qtype, np.full(2 * QK_K, 40, np.uint8), [5] * 2 * ngroups, [0.125, 0.125])
        codes = rng.integers(0, 64, 2 * QK_K, dtype=np.uint8)
        wide = pack(qtype, codes, rng.integers(-128, 128, 2 * ngroups), [65504.0, 2.0**-24])
        value = 0.125 * 5 * (40 - 32)
    else:
        top = 2**t.bits
        const = pack(qtype, rng.integers(0, top, 2 * QK_K), np.zeros(16), [0.5, 0.5], np.full(16, 37), [0.25, 0.25])
        wide = pack(qtype, rng.integers(0, top, 2 * QK_K), rng.integers(0, 64, 16), [65504.0, 2.0**-24],
                    rng.integers(0, 64, 16), [2.0**-24, 65504.0])
        value = -0.25 * 37
    raw = np.stack([const, wide])
    kb = decode_k(raw, qtype, (2, 2 * QK_K))
    ours, ref = dequantize_k(kb), reference(raw, qtype, (2, 2 * QK_K))
    assert np.all(ours[0] == np.float32(value))
    assert np.abs(ours[1]).max() > 1e6 and np.abs(ours[1][ours[1] != 0]).min() < 1e-5
    assert np.array_equal(ours, ref)
    if qtype != Q.Q6_K:
        assert np.array_equal(ours.view(np.uint32), ref.view(np.uint32))


@pytest.mark.parametrize("qtype", list(K_TYPES), ids=lambda t: t.name)
def test_data_forms(qtype):
    """bytes, a flat array, GGUFReader's (rows, bytes per row) and other C-order shapes decode the same."""
    raw = random_k_tensor(qtype, (4, 512), seed=11)
    want = decode_k(raw, qtype, (4, 512))
    for data in (raw.tobytes(), bytearray(raw.tobytes()), raw.reshape(-1), raw.reshape(8, -1), raw.reshape(2, 2, -1)):
        got = decode_k(data, qtype, (4, 512))
        assert all(np.array_equal(a, b) for a, b in zip(got[:3], want[:3]))
    assert decode_k(raw, int(qtype), [4, 512]).bits == want.bits


def test_gguf_file_round_trip(tmp_path):
    """Through a real file: GGUFReader's tensor.shape is ne (cols first), its data (rows, bytes per row)."""
    raw = {qtype: random_k_tensor(qtype, (3, 512), seed=int(qtype)) for qtype in K_TYPES}
    path = tmp_path / "k.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    for qtype, data in raw.items():
        writer.add_tensor(qtype.name, data, raw_shape=data.shape, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    for tensor in gguf.GGUFReader(str(path)).tensors:
        qtype = Q(tensor.tensor_type)
        shape = tuple(int(n) for n in reversed(tensor.shape.tolist()))
        assert shape == (3, 512)
        kb = decode_k(tensor.data, qtype, shape)
        assert np.array_equal(dequantize_k(kb), reference(raw[qtype], qtype, shape))


@pytest.mark.parametrize("qtype, match", [
    (Q.Q4_0, "Q4_0 is a 32-weight block type, not a K-quant: decode it with lorakit.formats.gguf_blocks"),
    (Q.Q8_0, "Q8_0 is a 32-weight block type"),
    (Q.Q2_K, "Q2_K has no INT-N reading.*Q4_K, Q5_K, Q6_K"),
    (Q.Q3_K, "Q3_K has no INT-N reading"),
    (Q.F16, "F16 is not block-quantized: load the tensor densely"),
    (Q.IQ4_XS, "IQ4_XS has no INT-N reading"),
    (999, "999 is not a GGML quantization type"),
])
def test_unsupported_types(qtype, match):
    with pytest.raises(ValueError, match=match):
        decode_k(np.zeros(144, np.uint8), qtype, (1, 256))


def test_bad_inputs():
    raw = random_k_tensor(Q.Q4_K, (2, 512))
    with pytest.raises(ValueError, match=r"cols=576 is not a multiple of the super-block size 256.*fallback"):
        decode_k(raw, Q.Q4_K, (2, 576))
    with pytest.raises(ValueError, match=r"shape=\(2, 512, 1\) must be two positive ints"):
        decode_k(raw, Q.Q4_K, (2, 512, 1))
    with pytest.raises(ValueError, match=r"shape=\(0, 512\) must be two positive ints"):
        decode_k(raw, Q.Q4_K, (0, 512))
    with pytest.raises(ValueError, match=r"takes 576 bytes \(144 per super-block of 256\), got 575"):
        decode_k(raw.reshape(-1)[:-1], Q.Q4_K, (2, 512))
    with pytest.raises(ValueError, match="Q5_K tensor of shape .* takes 704 bytes .* got 576"):
        decode_k(raw, Q.Q5_K, (2, 512))
    with pytest.raises(ValueError, match="raw uint8 bytes, got dtype int8"):
        decode_k(raw.view(np.int8), Q.Q4_K, (2, 512))
    with pytest.raises(ValueError, match="got dtype float32"):
        decode_k(raw.view(np.float32), Q.Q4_K, (2, 512))
    with pytest.raises(ValueError, match="uint8 numpy array or bytes, got list"):
        decode_k(raw.tolist(), Q.Q4_K, (2, 512))
    kb = decode_k(raw, Q.Q4_K, (2, 512))
    with pytest.raises(ValueError, match=r"scale must be float32 of shape \(2, 16\).*got float64"):
        dequantize_k(kb._replace(scale=kb.scale.astype(np.float64)))
    with pytest.raises(ValueError, match=r"offset must be float32 of shape \(2, 16\).*got float32 \(2, 8\)"):
        dequantize_k(kb._replace(offset=kb.offset[:, :8]))
    with pytest.raises(ValueError, match="codes must be < 2\\^bits = 16, got 16"):
        dequantize_k(kb._replace(codes=np.where(np.arange(512) == 3, np.uint8(16), kb.codes)))
    with pytest.raises(ValueError, match="codes must be a uint8 .* got int64"):
        dequantize_k(kb._replace(codes=kb.codes.astype(np.int64)))
    with pytest.raises(ValueError, match="group_size=48 must be a positive int dividing cols=512"):
        dequantize_k(kb._replace(group_size=48))
    with pytest.raises(ValueError, match="bits=9 must be an int in 1..8"):
        dequantize_k(kb._replace(bits=9))
    assert isinstance(kb, KBlocks)
