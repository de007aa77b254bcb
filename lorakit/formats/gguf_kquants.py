"""llama.cpp's K-quants (Q4_K, Q5_K, Q6_K) as INT-N codes with a float32 scale and offset per group.

A GGUF tensor of these types is a run of super-blocks, each covering 256 consecutive weights of one
row (the row's input columns j = 256·b … 256·b + 255), split into sub-blocks that each have their
own quantized scale. Little-endian:

    type  bytes  layout                                            sub-blocks   weight (q as stored)
    Q4_K  144    d:f16  dmin:f16  scales:12B  qs:128B              8 × 32       w = d·sc·q − dmin·m   q ∈ 0..15
    Q5_K  176    d:f16  dmin:f16  scales:12B  qh:32B  qs:128B      8 × 32       w = d·sc·q − dmin·m   q ∈ 0..31
    Q6_K  210    ql:128B  qh:64B  scales:16 × int8  d:f16          16 × 16      w = d·sc·(q − 32)     q ∈ 0..63

Q4_K / Q5_K sub-block scales: 8 six-bit scales sc and 8 six-bit mins m packed in 12 bytes s[0..11]:

    sc[i] = s[i] & 63,     m[i] = s[i + 4] & 63                                    i = 0..3
    sc[i] = (s[i + 4] & 15) | (s[i − 4] >> 6) << 4,                                 i = 4..7
    m[i]  = (s[i + 4] >> 4) | (s[i] >> 6) << 4

Q4_K / Q5_K weights: `qs` is 4 chunks of 32 bytes; byte l of chunk k holds weight l of sub-block 2k in
its low nibble and weight l of sub-block 2k + 1 in its high nibble. Q5_K's fifth bit of weight l of
sub-block i is bit i of `qh` byte l.

Q6_K weights: two halves of 128 weights, each with 64 bytes of `ql` and 32 bytes of `qh`. Within a half,
weight 32·r + l (r = 0..3, l = 0..31) takes its low 4 bits from `ql` byte l (r = 0, 2) or l + 32
(r = 1, 3), low nibble for r < 2 and high nibble for r ≥ 2, and its top 2 bits from bits 2r, 2r + 1 of
`qh` byte l. Sub-block i (weights 16·i … 16·i + 15) has the int8 scale sc[i].

Each group (one sub-block of one row) is read as "unsigned code, scale, offset":  w = scale · c + offset,
all float32, with the fp16 d and dmin widened to float32 first:

    Q4_K  bits 4, group_size 32:  c = q,  scale = d·sc,  offset = −(dmin·m)
    Q5_K  bits 5, group_size 32:  c = q,  scale = d·sc,  offset = −(dmin·m)
    Q6_K  bits 8, group_size 16:  c = q (0..63, stored as 8-bit codes),  scale = d·sc,  offset = −32·scale

Exactness against `gguf.quants.dequantize` (which computes as llama.cpp's reference C does):

- Q4_K, Q5_K: bit-identical. gguf computes (d·sc)·q − (dmin·m); `dequantize_k` computes
  (d·sc)·q + (−(dmin·m)), and IEEE defines a − b as a + (−b), so every bit (signs of zero included)
  agrees.
- Q6_K: the same values (max abs difference 0, 0 ulp), but not the same bits at some zeros. No step
  rounds: d has an 11-bit significand and |sc| ≤ 128, so d·sc fits in 18 bits; times c ≤ 63 that is
  at most 24 bits, a float32 significand, and the exponents stay far inside float32's range (|d| ≥ 2^−24
  unless 0, |w| < 2^30). So scale·c, −32·scale and their sum scale·(c − 32) are all exact, as is gguf's
  (d·sc)·(q − 32). The one difference is the sign of a zero: gguf's product is −0.0 where the signs of
  d·sc and (q − 32) differ (e.g. q = 32 with a negative int8 sc, which llama.cpp's quantizer can
  write), while scale·c + offset is a sum x + (−x), which is +0.0. Compared with `==` / np.array_equal
  the results are equal everywhere; their uint32 bit patterns are equal once gguf's −0.0 become +0.0
  (measured on random super-blocks in the tests: max abs difference 0, 0 ulp, bits differ only there).

Shapes are torch's (out, in) = (rows, cols): GGUF's `ne` lists the same dimensions reversed, and
`gguf.GGUFReader` gives a tensor's `data` as uint8 (rows, bytes per row).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

try:
    from gguf import GGMLQuantizationType
except ImportError as err:  # the [hf] extra; the rest of lorakit works without it
    raise ImportError("lorakit.formats.gguf_kquants needs the gguf package: pip install 'lorakit[hf]' "
                      "(or pip install gguf)") from err

from lorakit.formats.gguf_blocks import TYPES, as_qtype, check_not_dense, rows_cols  # noqa: E402

QK_K = 256  # weights per super-block, along the input dimension


class KType(NamedTuple):
    bits: int  # bits of the INT-N codes this type is read as
    group_size: int  # weights per sub-block: one scale and offset each
    bytes_per_superblock: int


K_TYPES: dict[GGMLQuantizationType, KType] = {
    GGMLQuantizationType.Q4_K: KType(4, 32, 2 + 2 + 12 + 128),
    GGMLQuantizationType.Q5_K: KType(5, 32, 2 + 2 + 12 + 32 + 128),
    GGMLQuantizationType.Q6_K: KType(8, 16, 128 + 64 + 16 + 2),
}



class KBlocks(NamedTuple):
    """One tensor's K-quant super-blocks as INT-N: w = scale · codes + offset per group of columns.

    codes:  uint8 (rows, cols), unsigned codes (Q4_K 0..15, Q5_K 0..31, Q6_K 0..63)
    scale:  float32 (rows, cols // group_size)
    offset: float32 (rows, cols // group_size)
    bits, group_size: how lorakit's INT-N reads the codes (Q4_K 4/32, Q5_K 5/32, Q6_K 8/16)
    """

    codes: np.ndarray
    scale: np.ndarray
    offset: np.ndarray
    bits: int
    group_size: int


def k_type(qtype: GGMLQuantizationType | int | str) -> KType:
    """The table row of `qtype`; a ValueError that says what to do for any other type."""
    qtype = as_qtype(qtype)
    if qtype in K_TYPES:
        return K_TYPES[qtype]
    supported = ", ".join(t.name for t in K_TYPES)
    if qtype in TYPES:
        raise ValueError(f"{qtype.name} is a 32-weight block type, not a K-quant: decode it with "
                         f"lorakit.formats.gguf_blocks.decode")
    check_not_dense(qtype)
    raise ValueError(f"{qtype.name} has no INT-N reading in lorakit (K-quants supported: {supported}): "
                     f"load it densely with gguf.quants.dequantize, or use a GGUF quantized to {supported}")


def _check_shape(shape: tuple[int, int], qtype: GGMLQuantizationType) -> tuple[int, int]:
    rows, cols = rows_cols(shape)
    if cols % QK_K:
        raise ValueError(f"{qtype.name} tensor of shape {tuple(shape)}: cols={cols} is not a multiple of the "
                         f"super-block size {QK_K}; pass (rows, cols) in torch order (GGUF's ne reversed). llama.cpp "
                         f"itself stores such tensors in a fallback type such as Q5_0 or Q8_0, not a K-quant")
    return rows, cols


def _raw_bytes(data: np.ndarray | bytes, qtype: GGMLQuantizationType) -> np.ndarray:
    if isinstance(data, (bytes, bytearray, memoryview)):
        return np.frombuffer(data, np.uint8)
    if not isinstance(data, np.ndarray):
        raise ValueError(f"{qtype.name} data must be a uint8 numpy array or bytes, got {type(data).__name__}")
    if data.dtype != np.uint8:
        raise ValueError(f"{qtype.name} data must be raw uint8 bytes, got dtype {data.dtype}: pass the tensor's "
                         f"bytes (e.g. arr.view(np.uint8)), not dequantized values")
    return data.reshape(-1)


def _f16(b: np.ndarray) -> np.ndarray:
    """Little-endian fp16 from a trailing axis of 2 bytes, widened to float32 (exact)."""
    return np.ascontiguousarray(b).view("<f2")[..., 0].astype(np.float32)


def _scales_mins(s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q4_K/Q5_K's 12 packed bytes (…, 12) → 6-bit scales and mins, uint8 (…, 8) each."""
    lo, mid, hi = s[..., 0:4], s[..., 4:8], s[..., 8:12]
    sc = np.concatenate([lo & np.uint8(63), (hi & np.uint8(15)) | ((lo >> np.uint8(6)) << np.uint8(4))], axis=-1)
    m = np.concatenate([mid & np.uint8(63), (hi >> np.uint8(4)) | ((mid >> np.uint8(6)) << np.uint8(4))], axis=-1)
    return sc, m


def decode_k(data: np.ndarray | bytes, qtype: GGMLQuantizationType | int, shape: tuple[int, int]) -> KBlocks:
    """Unpack a K-quant tensor's raw bytes (any uint8 array or bytes, C order) into codes, scale and offset."""
    t = k_type(qtype)
    qtype = GGMLQuantizationType(qtype)
    rows, cols = _check_shape(shape, qtype)
    raw = _raw_bytes(data, qtype)
    nsb = cols // QK_K
    if raw.size != rows * nsb * t.bytes_per_superblock:
        raise ValueError(f"{qtype.name} tensor of shape {(rows, cols)} takes {rows * nsb * t.bytes_per_superblock} "
                         f"bytes ({t.bytes_per_superblock} per super-block of {QK_K}), got {raw.size}: check the "
                         f"shape is (rows, cols) in torch order and the type is the tensor's own")
    blk = raw.reshape(rows, nsb, t.bytes_per_superblock)
    codes = np.empty((rows, nsb, QK_K), np.uint8)

    if qtype == GGMLQuantizationType.Q6_K:
        d = _f16(blk[..., 208:210])  # (rows, nsb)
        sc = blk[..., 192:208].view(np.int8).astype(np.float32)  # (rows, nsb, 16)
        scale = d[..., None] * sc
        offset = np.float32(-32) * scale  # exact: a power of two
        ql = blk[..., 0:128].reshape(rows, nsb, 2, 64)  # per half of 128 weights
        qh = blk[..., 128:192].reshape(rows, nsb, 2, 32)
        out = codes.reshape(rows, nsb, 2, 4, 32)  # (half, r, l): weight 128·half + 32·r + l
        out[..., 0:2, :] = (ql & np.uint8(15)).reshape(rows, nsb, 2, 2, 32)
        out[..., 2:4, :] = (ql >> np.uint8(4)).reshape(rows, nsb, 2, 2, 32)
        for r in range(4):  # the top two bits, from bits 2r, 2r + 1 of qh
            out[..., r, :] |= ((qh >> np.uint8(2 * r)) & np.uint8(3)) << np.uint8(4)
    else:  # Q4_K, Q5_K
        d = _f16(blk[..., 0:2])
        dmin = _f16(blk[..., 2:4])
        sc, m = _scales_mins(blk[..., 4:16])  # (rows, nsb, 8)
        scale = d[..., None] * sc.astype(np.float32)
        offset = -(dmin[..., None] * m.astype(np.float32))
        qs = blk[..., -128:].reshape(rows, nsb, 4, 32)
        out = codes.reshape(rows, nsb, 4, 2, 32)  # (chunk, nibble, l): sub-block 2·chunk + nibble
        out[..., 0, :] = qs & np.uint8(15)
        out[..., 1, :] = qs >> np.uint8(4)
        if qtype == GGMLQuantizationType.Q5_K:
            qh = blk[..., 16:48]  # (rows, nsb, 32): bit i of byte l is bit 4 of weight l of sub-block i
            sub = codes.reshape(rows, nsb, 8, 32)
            for i in range(8):
                sub[..., i, :] |= ((qh >> np.uint8(i)) & np.uint8(1)) << np.uint8(4)

    return KBlocks(codes.reshape(rows, cols), scale.reshape(rows, -1), offset.reshape(rows, -1), t.bits, t.group_size)


def dequantize_k(blocks: KBlocks) -> np.ndarray:
    """float32 (rows, cols): scale · codes + offset per group; equal to gguf.quants.dequantize (see the module
    docstring: bit-identical for Q4_K and Q5_K, identical values for Q6_K)."""
    codes, scale, offset, bits, group_size = blocks
    if not isinstance(codes, np.ndarray) or codes.dtype != np.uint8 or codes.ndim != 2:
        got = f"{codes.dtype} {codes.shape}" if isinstance(codes, np.ndarray) else type(codes).__name__
        raise ValueError(f"codes must be a uint8 (rows, cols) array, got {got}")
    if not isinstance(group_size, (int, np.integer)) or group_size <= 0 or codes.shape[1] % group_size:
        raise ValueError(f"group_size={group_size!r} must be a positive int dividing cols={codes.shape[1]}")
    if not isinstance(bits, (int, np.integer)) or not 1 <= bits <= 8:
        raise ValueError(f"bits={bits!r} must be an int in 1..8 (codes are uint8)")
    rows, cols = codes.shape
    groups = (rows, cols // group_size)
    for name, value in (("scale", scale), ("offset", offset)):
        if not isinstance(value, np.ndarray) or value.dtype != np.float32 or value.shape != groups:
            got = f"{value.dtype} {value.shape}" if isinstance(value, np.ndarray) else type(value).__name__
            raise ValueError(f"{name} must be float32 of shape {groups} (rows, cols // group_size), got {got}")
    if bits < 8 and codes.size and int(codes.max()) >= 1 << bits:
        raise ValueError(f"codes must be < 2^bits = {1 << bits}, got {int(codes.max())}")
    c = codes.reshape(rows, groups[1], group_size).astype(np.float32)
    return (scale[..., None] * c + offset[..., None]).reshape(rows, cols)
