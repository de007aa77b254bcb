"""llama.cpp's 32-weight blocks (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0) as INT-N codes, scales and offsets.

A GGUF tensor of these types is a run of blocks, each covering 32 consecutive weights of one row
(the row's input columns j = 32·b … 32·b + 31), little-endian:

    type  bytes  layout                                   weight (q as stored)
    Q4_0  18     d:f16  qs:16B                            w = d · (q − 8)      q ∈ 0..15
    Q4_1  20     d:f16  m:f16  qs:16B                     w = d · q + m        q ∈ 0..15
    Q5_0  22     d:f16  qh:4B  qs:16B                     w = d · (q − 16)     q ∈ 0..31
    Q5_1  24     d:f16  m:f16  qh:4B  qs:16B              w = d · q + m        q ∈ 0..31
    Q8_0  34     d:f16  qs:32 × int8                      w = d · q            q ∈ −128..127

Nibble order (not interleaved pairs): byte k of `qs` holds weight k in its low nibble and weight
k + 16 in its high nibble. The fifth bits: `qh` is a little-endian uint32 whose bit k is bit 4 of
weight k, so weight k's code is (low/high nibble) | ((qh >> k) & 1) << 4.

Every type is read as "unsigned code, scale, offset":  w = d · c + offset  with

    c ∈ {0, …, 2^bits − 1}:  c = q for Q4_x / Q5_x,  c = q + 128 for Q8_0
    offset = m (Q4_1, Q5_1);  −8·d, −16·d, −128·d (Q4_0, Q5_0, Q8_0; see `implied_offset`)

`dequantize` computes in float32 exactly as llama.cpp and `gguf.quants` do: fp16 → fp32 for d and
m, then d · (c − z) (symmetric types, z = 2^(bits−1)) or d · c + m, the same operations in the
same order, so the results are bit-identical. `encode(decode(x))` gives x back byte for byte.

Shapes are torch's (out, in) = (rows, cols): GGUF's tensor shape `ne` lists the same dimensions
reversed (ne[0] = cols), and `gguf.GGUFReader` gives `tensor.shape` in GGUF order, its `data` as
(rows, bytes per row).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

try:
    from gguf import GGMLQuantizationType
except ImportError as err:  # the [hf] extra; the rest of lorakit works without it
    raise ImportError("lorakit.formats.gguf_blocks needs the gguf package: pip install 'lorakit[hf]' "
                      "(or pip install gguf)") from err

BLOCK = 32  # weights per block, along the input dimension


class BlockType(NamedTuple):
    bits: int
    has_offset: bool  # a stored fp16 offset m per block (else the offset is implied by d)
    bytes_per_block: int


TYPES: dict[GGMLQuantizationType, BlockType] = {
    GGMLQuantizationType.Q4_0: BlockType(4, False, 2 + 16),
    GGMLQuantizationType.Q4_1: BlockType(4, True, 2 + 2 + 16),
    GGMLQuantizationType.Q5_0: BlockType(5, False, 2 + 4 + 16),
    GGMLQuantizationType.Q5_1: BlockType(5, True, 2 + 2 + 4 + 16),
    GGMLQuantizationType.Q8_0: BlockType(8, False, 2 + 32),
}

DENSE_TYPES = {"F32", "F16", "BF16", "F64", "I8", "I16", "I32", "I64"}  # GGUF types that hold the values themselves


class Blocks(NamedTuple):
    """One tensor's blocks, unpacked; `nb = in / 32` blocks per row.

    codes: uint8 (out, in), unsigned codes 0 … 2^bits − 1
    d:     float16 (out, nb), the scale of each block
    m:     float16 (out, nb), the offset of each block (Q4_1, Q5_1); None for Q4_0, Q5_0, Q8_0
    """

    codes: np.ndarray
    d: np.ndarray
    m: np.ndarray | None


def as_qtype(qtype: GGMLQuantizationType | int | str) -> GGMLQuantizationType:
    """A GGMLQuantizationType from itself, its number or its name ("Q4_1")."""
    try:
        return GGMLQuantizationType[qtype] if isinstance(qtype, str) else GGMLQuantizationType(qtype)
    except (KeyError, ValueError):
        raise ValueError(f"{qtype!r} is not a GGML quantization type") from None


def block_type(qtype: GGMLQuantizationType | int | str) -> BlockType:
    """The table row of `qtype`; a ValueError that says what to do for any other type."""
    qtype = as_qtype(qtype)
    if qtype in TYPES:
        return TYPES[qtype]
    supported = ", ".join(t.name for t in TYPES)
    if qtype.name.endswith("_K"):
        raise ValueError(
            f"{qtype.name} is a K-quant (256-weight super-blocks with quantized sub-block scales), not a 32-weight "
            f"block type ({supported}): read it with lorakit.formats.gguf_kquants.decode_k"
        )
    check_not_dense(qtype)
    raise ValueError(f"{qtype.name} has no INT-N reading in lorakit: load it densely with gguf.quants.dequantize, "
                     f"or use a GGUF quantized to {supported}")


def check_not_dense(qtype: GGMLQuantizationType) -> None:
    """A dense GGUF type asked for as a quantized one: say how to load it instead."""
    if qtype.name in DENSE_TYPES:
        raise ValueError(f"{qtype.name} is not block-quantized: load the tensor densely (its data is the values), "
                         f"then quantize it with lorakit if you want INT-N")


def rows_cols(shape: tuple[int, int]) -> tuple[int, int]:
    """(rows, cols) of a 2-D tensor shape, checked to be two positive ints."""
    if (not isinstance(shape, (tuple, list)) or len(shape) != 2
            or not all(isinstance(n, (int, np.integer)) and n > 0 for n in shape)):
        raise ValueError(f"shape={shape!r} must be two positive ints (rows, cols) in torch order (GGUF's ne reversed)")
    return int(shape[0]), int(shape[1])


def _check_shape(shape: tuple[int, int], qtype: GGMLQuantizationType) -> tuple[int, int]:
    rows, cols = rows_cols(shape)
    if cols % BLOCK:
        raise ValueError(f"{qtype.name} tensor of shape {shape}: cols={cols} is not a multiple of the block size "
                         f"{BLOCK}; pass (rows, cols) in torch order (GGUF's ne reversed), or load it densely")
    return rows, cols


def decode(data: np.ndarray | bytes, qtype: GGMLQuantizationType | int | str, shape: tuple[int, int]) -> Blocks:
    """Unpack a tensor's raw bytes (any uint8 array or bytes, C order) into codes, d and m."""
    t = block_type(qtype)
    qtype = as_qtype(qtype)
    rows, cols = _check_shape(shape, qtype)
    if isinstance(data, np.ndarray) and data.dtype != np.uint8:
        raise ValueError(f"{qtype.name} data must be raw uint8 bytes, got dtype {data.dtype}")
    raw = np.frombuffer(data, np.uint8) if isinstance(data, (bytes, bytearray, memoryview)) else data.reshape(-1)
    nb = cols // BLOCK
    if raw.size != rows * nb * t.bytes_per_block:
        raise ValueError(f"{qtype.name} tensor of shape {(rows, cols)} takes {rows * nb * t.bytes_per_block} bytes "
                         f"({t.bytes_per_block} per block of {BLOCK}), got {raw.size}: check the shape is (rows, cols) "
                         f"in torch order and the type is the tensor's own")
    blk = raw.reshape(rows, nb, t.bytes_per_block)  # (out, nb, bytes)
    d = np.ascontiguousarray(blk[..., 0:2]).view("<f2")[..., 0].astype(np.float16)  # (out, nb)
    at = 2
    m = None
    if t.has_offset:
        m = np.ascontiguousarray(blk[..., 2:4]).view("<f2")[..., 0].astype(np.float16)
        at = 4
    if t.bits == 8:
        codes = blk[..., at:] ^ np.uint8(0x80)  # int8 q -> q + 128: flipping the sign bit
    else:
        qs = blk[..., -16:]  # (out, nb, 16): weight k low nibble, weight k + 16 high nibble
        codes = np.concatenate([qs & np.uint8(0x0F), qs >> np.uint8(4)], axis=-1)  # (out, nb, 32)
        if t.bits == 5:
            qh = blk[..., at:at + 4]  # little-endian uint32: bit k of byte k // 8 is weight k's bit 4
            codes |= np.unpackbits(qh, axis=-1, bitorder="little") << np.uint8(4)
    return Blocks(codes.reshape(rows, cols), d, m)


def _check_blocks(blocks: Blocks, qtype: GGMLQuantizationType, t: BlockType) -> tuple[int, int]:
    codes, d, m = blocks
    if not isinstance(codes, np.ndarray) or codes.dtype != np.uint8 or codes.ndim != 2:
        raise ValueError(f"{qtype.name} codes must be a uint8 (out, in) array")
    rows, cols = _check_shape(codes.shape, qtype)
    for name, value in (("d", d), ("m", m)) if t.has_offset else (("d", d),):
        if not isinstance(value, np.ndarray) or value.dtype != np.float16 or value.shape != (rows, cols // BLOCK):
            got = f"{value.dtype} {value.shape}" if isinstance(value, np.ndarray) else type(value).__name__
            raise ValueError(f"{qtype.name} {name} must be float16 of shape {(rows, cols // BLOCK)}, got {got}: "
                             f"a GGUF block stores fp16, so round explicitly (.astype(np.float16)) if you mean to")
    if not t.has_offset and m is not None:
        raise ValueError(f"{qtype.name} has no stored offset (it is implied by d); pass m=None")
    if t.bits < 8 and codes.size and int(codes.max()) >= 1 << t.bits:
        raise ValueError(f"{qtype.name} codes must be < {1 << t.bits}, got {int(codes.max())}")
    return rows, cols


def encode(blocks: Blocks, qtype: GGMLQuantizationType | int | str) -> np.ndarray:
    """Pack codes, d and m into the tensor's raw bytes: uint8 (out, in/32 · bytes_per_block)."""
    t = block_type(qtype)
    qtype = as_qtype(qtype)
    rows, cols = _check_blocks(blocks, qtype, t)
    nb = cols // BLOCK
    codes = blocks.codes.reshape(rows, nb, BLOCK)
    out = np.empty((rows, nb, t.bytes_per_block), np.uint8)
    out[..., 0:2] = blocks.d.astype("<f2")[..., None].view(np.uint8)
    at = 2
    if t.has_offset:
        out[..., 2:4] = blocks.m.astype("<f2")[..., None].view(np.uint8)
        at = 4
    if t.bits == 8:
        out[..., at:] = codes ^ np.uint8(0x80)
    else:
        out[..., -16:] = (codes[..., :16] & np.uint8(0x0F)) | (codes[..., 16:] << np.uint8(4))
        if t.bits == 5:
            out[..., at:at + 4] = np.packbits(codes >> np.uint8(4), axis=-1, bitorder="little")
    return out.reshape(rows, nb * t.bytes_per_block)


def implied_offset(blocks: Blocks, qtype: GGMLQuantizationType | int | str) -> np.ndarray:
    """Each block's offset in w = d · c + offset, float32 (out, nb): m, or −2^(bits−1)·d for the
    symmetric types. Exact: an fp16 d times a power of two is a float32."""
    t = block_type(qtype)
    if t.has_offset:
        return blocks.m.astype(np.float32)
    return np.float32(-(1 << (t.bits - 1))) * blocks.d.astype(np.float32)


def dequantize(blocks: Blocks, qtype: GGMLQuantizationType | int | str) -> np.ndarray:
    """float32 (out, in), bit-identical to llama.cpp's and gguf.quants' dequantization."""
    t = block_type(qtype)
    rows, cols = _check_blocks(blocks, as_qtype(qtype), t)
    codes = blocks.codes.reshape(rows, cols // BLOCK, BLOCK)
    d = blocks.d.astype(np.float32)[..., None]  # (out, nb, 1)
    if t.has_offset:
        w = d * codes.astype(np.float32) + blocks.m.astype(np.float32)[..., None]
    else:  # the signed code as an exact float, as llama.cpp forms it: q − 8, q − 16, int8 q
        w = d * (codes.astype(np.int16) - (1 << (t.bits - 1))).astype(np.float32)
    return w.reshape(rows, cols)
