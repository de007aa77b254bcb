"""Block-wise 4-bit weights (NF4, FP4, symmetric INT4), bit-compatible with bitsandbytes.

A weight W (out, in) is flattened row-major to w (n,), n = out·in, and cut into blocks of
`block_size` consecutive values (the last block may be shorter). For block b and code table
`code` (16 float32 values, one per 4-bit nibble):

    absmax_b = max_i |w_i|                                    float32
    x_i      = clamp(w_i · (1 / absmax_b), -1, 1)             float32
    q_i      = the nibble whose code value is nearest to x_i  (ties go to the lower value; the
               midpoints between neighbouring code values are computed in float32)
    Ŵ_i      = code[q_i] · absmax_b                           float32, then cast once to the asked dtype

Codes are packed two per byte, the even index in the high nibble: byte_j = q_2j << 4 | q_2j+1
(an odd n pads with the code of 0.0). The code tables:

- NF4 (QLoRA): quantiles of N(0, 1) scaled to [-1, 1], with an exact zero;
- FP4: bitsandbytes' 1-sign / 2-exponent / 1-mantissa float, divided by its maximum (12);
- INT4: symmetric, q ∈ [-7, 7] stored as nibble q + 8, value q / 7 (the scale is absmax / 7);
  nibble 0 (-8/7) is never produced. INT4 is lorakit's own (bitsandbytes has no 4-bit int).

Double quantization (QLoRA §3) stores the absmax vector (n_blocks,) in 8 bits:

    offset = mean(absmax)
    c      = absmax - offset, in blocks of `double_quant_block_size` (256)
    s_k    = max |c| over block k,  absmax_codes = 8-bit dynamic-map code of c / s_k
    absmax ≈ dynamic[absmax_codes] · s_k + offset             float32

Bits per parameter: 4 + 32/64 = 4.5 plain; 4 + 8/64 + 32/(64·256) ≈ 4.127 with double quantization.

Bit-exactness with bitsandbytes 0.50 (`quantize_4bit(..., compress_statistics=...)` /
`dequantize_4bit`, NF4 and FP4, its block sizes 32…4096 and double-quantization block 256; any
shape, also when n is not a multiple of the block): the same float32 operations as its CPU kernels,
quirks included. A last, partial 4-bit block divides by its absmax (full blocks multiply by the
reciprocal) and stores an all-zero partial block's absmax as 1e-38; the 8-bit absmax quantizer
looks the code up in a 65,536-bin table (the code nearest the bin's left edge) rather than rounding
exactly, and an all-zero 8-bit block stores code 0. One bitsandbytes kernel disagrees with its own
format: on AVX-512 CPUs its `dequantize_4bit` indexes absmax per row, wrong when in_features is not
a multiple of the block; lorakit follows the flat blocks that its quantizer and other kernels use.
Other block sizes (any positive even number) work here but have no bitsandbytes counterpart.
"""

from __future__ import annotations

import functools
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from lorakit.quant.storage import PackedWeight

NF4_CODE = torch.tensor([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
], dtype=torch.float32)
FP4_CODE = torch.tensor(
    [0.0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0, -0.0, -0.0625, -8.0, -12.0, -4.0, -6.0, -2.0, -3.0],
    dtype=torch.float32,
) / 12.0
INT4_CODE = (torch.arange(16, dtype=torch.float32) - 8.0) / 7.0

_LUT_BINS = 65536  # bitsandbytes' 8-bit CPU quantizer: [-1, 1] cut into 65,536 bins


def check_block_size(name: str, value: object) -> int:
    """`value` if it is a positive even int, else a ValueError naming `name` and the fix."""
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0 or value % 2:
        raise ValueError(
            f"{name}={value!r} must be a positive multiple of 2, e.g. 64 (bitsandbytes' block_size) "
            "or 256 (its double_quant_block_size)"
        )
    return value


def _ceil_div(n: int, block_size: int) -> int:
    return -(-n // block_size)


# ---- packing ---------------------------------------------------------------------------------

def pack_4bit(q: Tensor) -> Tensor:
    """uint8 codes (2m,), each < 16 -> uint8 (m,), two per byte, the even index in the high nibble."""
    assert q.dtype == torch.uint8 and q.numel() % 2 == 0
    return (q[0::2] << 4) | q[1::2]


def _memo(fn):
    """`functools.cache` (positional arguments) that compiled code can read: dynamo traces through a
    functools.cache'd function and would rebuild the table inside the graph (the 8-bit map's `tolist` even
    splits it: `train.compile`), while an entry of a plain dict, filled when the weights were quantized, is
    read as it is."""
    store: dict = {}

    @functools.wraps(fn)
    def cached(*args):
        if args not in store:
            store[args] = fn(*args)
        return store[args]

    cached.cache_clear = store.clear
    return cached


def unpack_4bit(packed: Tensor) -> Tensor:
    """uint8 (m,) -> uint8 codes (2m,), the inverse of `pack_4bit`."""
    return torch.stack([packed >> 4, packed & 0xF], dim=-1).reshape(-1)


@_memo
def _tables(code_name: str, device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
    """A code table as whole-byte lookups (one gather per byte is much faster than per-nibble work):

    - values (256, 2) float32: the two code values each byte holds;
    - midpoints (15,) float32: between neighbouring code values in sorted order;
    - to_byte (256,) uint8: the byte holding sorted slots (s0, s1), at index s0·16 + s1.
    """
    code = CODES[code_name].to(device)
    nibbles = unpack_4bit(torch.arange(256, device=device).to(torch.uint8)).long()   # (512,): each byte's pair
    sorted_code, order = code.sort(stable=True)  # FP4 is not sorted by nibble; its +0 sorts before -0
    to_byte = pack_4bit(order.to(torch.uint8)[nibbles])
    return code[nibbles].view(256, 2), (sorted_code[:-1] + sorted_code[1:]) / 2, to_byte


# ---- 4-bit block quantization ----------------------------------------------------------------

def quantize_4bit(w: Tensor, code_name: str, block_size: int) -> tuple[Tensor, Tensor]:
    """w (any shape, n values) -> (packed uint8 (ceil(n/2),), absmax float32 (ceil(n/block_size),))."""
    _, midpoints, to_byte = _tables(code_name, w.device)
    flat = w.reshape(-1).float()
    n = flat.numel()
    full = n - n % block_size
    blocks = flat[:full].view(-1, block_size)                    # (n_full_blocks, block_size)
    absmax = blocks.abs().amax(dim=1)                             # (n_full_blocks,)
    parts = [(blocks * (1.0 / absmax.clamp(min=1e-38)).unsqueeze(1)).view(-1)]
    if full < n:  # bitsandbytes divides the last, partial block and keeps its clamped absmax
        tail_absmax = flat[full:].abs().max().clamp(min=1e-38)
        absmax = torch.cat([absmax, tail_absmax.view(1)])
        parts.append(flat[full:] / tail_absmax)
    if n % 2:
        parts.append(flat.new_zeros(1))
    x = (torch.cat(parts) if len(parts) > 1 else parts[0]).clamp_(-1, 1)
    slots = torch.bucketize(x, midpoints, out_int32=True).view(-1, 2)  # right=False: a tie goes to the lower value
    return to_byte.index_select(0, slots[:, 0] * 16 + slots[:, 1]), absmax


def dequantize_4bit(
    packed: Tensor, absmax: Tensor, code_name: str, block_size: int, n: int, dtype: torch.dtype,
) -> Tensor:
    """packed uint8 (m,), absmax float32 (n_blocks,) -> (n,) in `dtype` (computed in float32, cast once).

    Each byte's two float32 values are gathered as one 8-byte element (a 1-D gather), and whole blocks are
    scaled in place: one fresh (n,) float32 buffer instead of three (on a CPU, the fresh pages of a large
    buffer cost more than the arithmetic)."""
    pairs = _pairs(code_name, packed.device)
    if n == 2 * packed.numel() == absmax.numel() * block_size:  # whole blocks
        if chunked(n, packed.device):
            return _dequantize_chunks(pairs, packed, absmax, block_size, dtype)
        return _decode_blocks(pairs, packed, absmax, block_size).to(dtype)
    values = pairs.index_select(0, packed.int()).view(torch.float32)      # (2m,) float32
    return _scale_blocks(values, absmax, block_size, n).to(dtype)


def _pairs(code_name: str, device: torch.device) -> Tensor:
    """float64 (256,): each byte's two float32 code values (v_hi, v_lo) viewed as one 8-byte element."""
    return _tables(code_name, device)[0].view(torch.float64).view(-1)


def _decode_blocks(pairs: Tensor, packed: Tensor, absmax: Tensor, block_size: int, out: Tensor | None = None) -> Tensor:
    """packed uint8 (any shape, m bytes) of whole blocks, absmax float32 (2m/block_size values) -> float32 (2m,):
    one 1-D gather of each byte's pair (`_pairs`), then each block scaled by its absmax in place; into `out`
    (float32 (2m,), contiguous) when given: the one decoding of `dequantize_4bit` whole and in chunks."""
    index = packed.reshape(-1).int()
    if out is None:
        values = pairs.index_select(0, index).view(torch.float32)
    else:
        values = torch.index_select(pairs, 0, index, out=out.view(torch.float64)).view(torch.float32)
    values.view(-1, block_size).mul_(absmax.reshape(-1, 1))
    return values


CHUNK = 1 << 21  # elements: a float32 piece of 8 MiB, reused from the heap (under glibc's mmap threshold)


def chunked(n: int, device: torch.device) -> bool:
    """Whether a CPU weight of n elements is dequantized `CHUNK` elements at a time: when its float32 form would
    be over 16 MiB (a 2048 x 8192 MLP weight of a 1.7B model). One float32 buffer that large is a fresh mapping
    of the kernel's, faulted in page by page at every dequantization (glibc serves requests over 32 MiB that
    way, whatever `lorakit.training.allocator` sets), and each pass over it runs from memory; an 8 MiB chunk is
    reused from the heap and stays in cache between the gather, the scaling and the cast into the one dense
    result. Measured (2-core Xeon, AVX-512, torch 2.13), 2048 x 8192 NF4 to bf16: 49-68 ms whole, 13-22 ms in
    chunks; at 2048 x 2048 and below whole is as fast or faster. Multiplying by the weight in pieces instead
    (never dense whole) was slower than this (the README's scaling section). Not on a GPU, and not in compiled
    code (Inductor makes its own loops)."""
    return n > 2 * CHUNK and device.type == "cpu" and not torch.compiler.is_compiling()


def _dequantize_chunks(pairs: Tensor, packed: Tensor, absmax: Tensor, block_size: int, dtype: torch.dtype) -> Tensor:
    """`dequantize_4bit` of whole blocks, `CHUNK` elements (whole blocks) at a time into one (n,) `dtype` result:
    bit-identical (the same float32 gather and product, rounded to `dtype` once)."""
    n = 2 * packed.numel()
    out = torch.empty(n, dtype=dtype, device=packed.device)
    step = max(CHUNK // block_size, 1) * block_size  # whole blocks; even (block sizes are)
    buffer = None if dtype == torch.float32 else torch.empty(step, dtype=torch.float32, device=packed.device)
    for start in range(0, n, step):
        end = min(start + step, n)
        values = out[start:end] if buffer is None else buffer[:end - start]  # float32 (k,), written in place
        _decode_blocks(pairs, packed[start // 2:end // 2], absmax[start // block_size:end // block_size],
                       block_size, out=values)
        if buffer is not None:
            out[start:end].copy_(values)
    return out


def _scale_blocks(values: Tensor, absmax: Tensor, block_size: int, n: int) -> Tensor:
    """values (≥ n,) · absmax of their block -> (n,) float32."""
    pad = absmax.numel() * block_size - n
    padded = F.pad(values[:n], (0, pad)) if pad else values[:n]
    return (padded.view(-1, block_size) * absmax.unsqueeze(1)).view(-1)[:n]


# ---- 8-bit double quantization of the absmax constants ----------------------------------------

@_memo
def dynamic_map_8bit(device: torch.device = torch.device("cpu")) -> Tensor:
    """bitsandbytes' signed 8-bit dynamic map (`create_dynamic_map()`): 256 sorted float32 values in [-0.993, 1].

    For exponent e = 0..6, 2^e values (10^(e-6)) · m, m the midpoints of linspace(0.1, 1, 2^e + 1),
    and their negatives; plus 0 and 1.
    """
    data = [0.0, 1.0]
    for e in range(7):
        bounds = torch.linspace(0.1, 1, 2**e + 1, dtype=torch.float32)
        means = (bounds[:-1] + bounds[1:]) / 2.0
        data += ((10 ** (e - 6)) * means).tolist() + (-(10 ** (e - 6)) * means).tolist()
    return torch.tensor(sorted(data), dtype=torch.float32, device=device)


def quantize_8bit(x: Tensor, block_size: int) -> tuple[Tensor, Tensor]:
    """x float32 (n,) -> (codes uint8 (n,), absmax float32 (ceil(n/block_size),)), dynamic-map codes."""
    code = dynamic_map_8bit(x.device)
    n = x.numel()
    blocks = F.pad(x, (0, _ceil_div(n, block_size) * block_size - n)).view(-1, block_size)
    absmax = blocks.abs().amax(dim=1)
    scaled = (blocks * (1.0 / absmax).unsqueeze(1)).clamp(-1, 1)
    # bitsandbytes' CPU kernel: bin k of 65,536 over [-1, 1] holds the code nearest its left edge.
    k = ((scaled + 1.0) * 0.5 * (_LUT_BINS - 1) + 0.5).int()
    edge = -1.0 + (2.0 * k.float()) / (_LUT_BINS - 1)
    codes = torch.bucketize(edge, (code[:-1] + code[1:]) / 2, out_int32=True)
    codes = torch.where(absmax.unsqueeze(1) == 0, 0, codes)       # an all-zero block stores code 0
    return codes.to(torch.uint8).view(-1)[:n], absmax


def dequantize_8bit(codes: Tensor, absmax: Tensor, block_size: int) -> Tensor:
    """codes uint8 (n,), absmax float32 (n_blocks,) -> float32 (n,)."""
    values = dynamic_map_8bit(codes.device).index_select(0, codes.int())
    return _scale_blocks(values, absmax, block_size, codes.numel())


# ---- the weight modules ------------------------------------------------------------------------

class BlockwiseWeight(PackedWeight):
    """A frozen (out, in) weight in 4-bit block-wise form; subclasses fix the code table.

    Buffers (n = out·in, n_blocks = ceil(n / block_size)):

    - ``codes``: uint8 (ceil(n/2),), two 4-bit codes per byte, bitsandbytes' nibble order;
    - without double quantization: ``absmax``: float32 (n_blocks,);
    - with double quantization: ``absmax_codes``: uint8 (n_blocks,), ``nested_absmax``: float32
      (ceil(n_blocks / double_quant_block_size),), ``nested_offset``: float32 () (the mean).

    The constructor allocates an empty skeleton (for `load_state_dict`); `from_float` fills one.
    `shape`, `dtype` (the original weight's), `block_size`, `double_quant` and
    `double_quant_block_size` are plain attributes, not state; `device` is the buffers'.
    """

    quant_type: ClassVar[str]

    def __init__(
        self,
        shape: tuple[int, int],
        dtype: torch.dtype = torch.float32,
        block_size: int = 64,
        double_quant: bool = True,
        double_quant_block_size: int = 256,
        device: torch.device | str | None = None,
    ):
        super().__init__()
        self.shape = torch.Size(shape)
        self.dtype = dtype
        self.block_size = check_block_size("block_size", block_size)
        self.double_quant = bool(double_quant)
        self.double_quant_block_size = check_block_size("double_quant_block_size", double_quant_block_size)
        n = self.shape.numel()
        n_blocks = _ceil_div(n, block_size)
        self.register_buffer("codes", torch.zeros(_ceil_div(n, 2), dtype=torch.uint8, device=device))
        if self.double_quant:
            self.register_buffer("absmax_codes", torch.zeros(n_blocks, dtype=torch.uint8, device=device))
            n_nested = _ceil_div(n_blocks, double_quant_block_size)
            self.register_buffer("nested_absmax", torch.zeros(n_nested, device=device))
            self.register_buffer("nested_offset", torch.zeros((), device=device))
        else:
            self.register_buffer("absmax", torch.zeros(n_blocks, device=device))

    @classmethod
    def from_float(
        cls, w: Tensor, block_size: int = 64, double_quant: bool = True, double_quant_block_size: int = 256,
    ) -> BlockwiseWeight:
        """Quantize a float (out, in) weight (float32 / float16 / bfloat16 give bitsandbytes' bytes)."""
        if not isinstance(w, Tensor) or not w.is_floating_point():
            raise TypeError(f"{cls.__name__}.from_float expects a floating-point tensor, got {_describe(w)}")
        if w.dim() != 2:
            raise ValueError(
                f"{cls.__name__}.from_float expects a 2-D (out_features, in_features) weight, got shape "
                f"{tuple(w.shape)}; reshape it first, e.g. w.reshape(w.shape[0], -1)"
            )
        self = cls(w.shape, w.dtype, block_size, double_quant, double_quant_block_size, device=w.device)
        w = w.detach()
        packed, absmax = quantize_4bit(w, self.quant_type, block_size)
        self.codes.copy_(packed)
        if double_quant:
            offset = absmax.mean()
            absmax_codes, nested_absmax = quantize_8bit(absmax - offset, double_quant_block_size)
            self.absmax_codes.copy_(absmax_codes)
            self.nested_absmax.copy_(nested_absmax)
            self.nested_offset.copy_(offset)
        else:
            self.absmax.copy_(absmax)
        return self

    def block_absmax(self) -> Tensor:
        """float32 (n_blocks,): the per-block scale, double-dequantized when stored in 8 bits."""
        if not self.double_quant:
            return self.absmax
        absmax = dequantize_8bit(self.absmax_codes, self.nested_absmax, self.double_quant_block_size)
        return absmax + self.nested_offset

    def dequantize(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """The dense (out, in) weight in `dtype` (computed in float32, cast once)."""
        flat = dequantize_4bit(
            self.codes, self.block_absmax(), self.quant_type, self.block_size, self.shape.numel(), dtype,
        )
        return flat.view(self.shape)

    def extra_repr(self) -> str:
        dq = f", double_quant_block_size={self.double_quant_block_size}" if self.double_quant else ""
        return (
            f"shape={tuple(self.shape)}, dtype={self.dtype}, block_size={self.block_size}, "
            f"double_quant={self.double_quant}{dq}, bits_per_param={self.bits_per_param:.3f}"
        )


class NF4Weight(BlockwiseWeight):
    """4-bit NormalFloat (QLoRA): codes are quantiles of N(0, 1) in [-1, 1]. See `BlockwiseWeight`."""

    quant_type = "nf4"


class FP4Weight(BlockwiseWeight):
    """bitsandbytes' 4-bit float (1 sign, 2 exponent, 1 mantissa bit). See `BlockwiseWeight`."""

    quant_type = "fp4"


class Int4Weight(BlockwiseWeight):
    """Symmetric 4-bit integer: q ∈ [-7, 7], scale absmax / 7, no zero point. See `BlockwiseWeight`."""

    quant_type = "int4"


CODES = {"nf4": NF4_CODE, "fp4": FP4_CODE, "int4": INT4_CODE}
WEIGHT_TYPES: dict[str, type[BlockwiseWeight]] = {"nf4": NF4Weight, "fp4": FP4Weight, "int4": Int4Weight}


def weight_class(quant_type: str) -> type[BlockwiseWeight]:
    """The weight module for `quant_type` ("nf4", "fp4" or "int4")."""
    if quant_type not in WEIGHT_TYPES:
        raise ValueError(f"quant_type={quant_type!r} is not supported; choose one of {sorted(WEIGHT_TYPES)}")
    return WEIGHT_TYPES[quant_type]


def _describe(obj: object) -> str:
    return f"a {obj.dtype} tensor" if isinstance(obj, Tensor) else type(obj).__name__
