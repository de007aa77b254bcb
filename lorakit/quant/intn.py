"""Group-wise asymmetric INT-N weights: QA-LoRA's frozen base (and llama.cpp's Q4_1 / Q5_1 block).

A weight W (out, in) is quantized per output row in groups of `group_size` consecutive input
columns (in % group_size == 0). For row i and group G = j // group_size:

    W_q[i, j] = scale[i, G] · q[i, j] + offset[i, G],   q ∈ {0, …, 2^bits − 1},  bits ∈ {2, 3, 4, 5, 8}

with float32 `scale` and float32 `offset`. The paper writes the same grid as scale · (q − zero);
offset = −scale · zero is the float zero-point in weight units, and it is llama.cpp's Q4_1 / Q5_1
block exactly (w = d · q + m: scale = d, offset = m), computed in the same float32 operations, so
a GGUF tensor loads with its own codes and dequantizes bit for bit as llama.cpp does. A float
offset can move by any amount: that is what makes QA-LoRA's merge exact. Round-to-nearest (RTN)
min-max quantization of a group x:

    scale = (max x − min x) / (2^bits − 1),  offset = min x,  q = clamp(round((x − offset) / scale))

so the group's min and max are on the grid (q = 0 and q = 2^bits − 1). A constant group takes
scale = 1, offset = x, q = 0 (exact). A QA-LoRA update that is constant inside each group,
ΔW[i, j] = δ[i, G], merges by moving only the offsets: offset[i, G] ← offset[i, G] + δ[i, G].

Deployment precision: a format that stores scale and offset in float16 (llama.cpp's Q4_1 / Q5_1)
cannot hold a merged offset m + δ exactly; it holds fp16(m + δ). An update smaller than half an fp16
ulp of m (2^-12 · |m|) vanishes there, and a short fine-tune's updates are mostly that small (measured on
SmolLM2's Q4_1 file: 99% of the offsets unchanged after rounding). `offset_dtype` (None, or
torch.float16) records that precision: QA-LoRA then trains against fp16(m + δ) − m with a
straight-through gradient (`LoraLayer`), so the model it trains is the file it exports.
`scale_dtype=torch.float16` in `from_float` rounds scale and offset to fp16 first (llama.cpp's layout).

Storage: the codes are a bit stream, `bits` bits per weight, least significant bit first, in
row-major order (`pack_codes` / `unpack_codes`); 2, 4 and 8 bits take a fast path.
"""

from __future__ import annotations

import torch
from torch import Tensor

from lorakit.quant import blockwise
from lorakit.quant.storage import PackedWeight

BITS = (2, 3, 4, 5, 8)


def check_bits(bits: int) -> int:
    if isinstance(bits, bool) or bits not in BITS:
        raise ValueError(f"bits={bits!r} is not supported; choose one of {list(BITS)}")
    return bits


def check_group_size(group_size: int, in_features: int, name: str = "weight") -> int:
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
        raise ValueError(f"group_size={group_size!r} must be a positive integer (QA-LoRA uses 32, 64 or 128)")
    if in_features % group_size:
        divisors = [g for g in (32, 64, 128) if in_features % g == 0]
        raise ValueError(
            f"group_size={group_size} does not divide {name}'s input size {in_features}; "
            f"use one that does ({divisors or 'a divisor of ' + str(in_features)}) or exclude this layer"
        )
    return group_size


def pack_codes(codes: Tensor, bits: int) -> Tensor:
    """uint8 codes (n,) with values < 2^bits -> uint8 (ceil(n·bits/8),), LSB-first bit stream."""
    codes = codes.reshape(-1).to(torch.uint8)
    n = codes.numel()
    if 8 % bits == 0:  # 2, 4, 8: whole codes per byte
        per = 8 // bits
        pad = (-n) % per
        c = torch.nn.functional.pad(codes, (0, pad)).view(-1, per).to(torch.int32)
        shifts = torch.arange(per, dtype=torch.int32, device=codes.device) * bits
        return (c << shifts).sum(dim=1).to(torch.uint8)
    bit_values = (codes[:, None].to(torch.int32) >> torch.arange(bits, device=codes.device, dtype=torch.int32)) & 1
    stream = bit_values.reshape(-1)  # (n·bits,)
    stream = torch.nn.functional.pad(stream, (0, (-stream.numel()) % 8)).view(-1, 8)
    return (stream << torch.arange(8, device=codes.device, dtype=torch.int32)).sum(dim=1).to(torch.uint8)


def unpack_codes(packed: Tensor, bits: int, n: int) -> Tensor:
    """The inverse of `pack_codes`: uint8 (ceil(n·bits/8),) -> uint8 codes (n,). `packed` may be any shape (rows
    of whole bytes, `IntNWeight._rows`), read in row-major order."""
    # shifts by a Python int (a vectorised kernel; a broadcast tensor of shifts runs ~3x slower on CPU)
    if bits == 8:
        return packed.reshape(-1)[:n].clone()  # a fresh tensor, as for other widths: callers may write into it
    if 8 % bits == 0:
        mask = (1 << bits) - 1
        return torch.stack([(packed >> (i * bits)) & mask for i in range(8 // bits)], dim=-1).reshape(-1)[:n]
    stream = torch.stack([(packed >> i) & 1 for i in range(8)], dim=-1)  # (m, 8) bits, LSB first
    bit_values = stream.reshape(-1)[: n * bits].view(n, bits)
    codes = bit_values[:, 0].clone()
    for k in range(1, bits):
        codes |= bit_values[:, k] << k
    return codes


def minmax_params(w: Tensor, bits: int, group_size: int,
                  scale_dtype: torch.dtype | None = None) -> tuple[Tensor, Tensor]:
    """RTN min-max scale and offset of each (row, group) of w (out, in): two float32 (out, in/g).

    `scale_dtype` (e.g. torch.float16): both are rounded to values of that dtype (held in float32);
    a scale that would round to 0 takes the dtype's smallest positive value."""
    out_features, in_features = w.shape
    groups = w.float().view(out_features, in_features // group_size, group_size)
    lo, hi = groups.amin(dim=2), groups.amax(dim=2)
    flat = hi == lo
    scale = torch.where(flat, torch.ones_like(lo), (hi - lo) / (2**bits - 1))
    if scale_dtype is not None and scale_dtype != torch.float32:
        info = torch.finfo(scale_dtype)
        tiny = info.smallest_normal * info.eps  # the smallest positive (subnormal) value
        scale = scale.to(scale_dtype).float().clamp_(min=tiny)
        lo = lo.to(scale_dtype).float()
    return scale, lo


def round_to_grid(w: Tensor, scale: Tensor, offset: Tensor, bits: int) -> Tensor:
    """q = clamp(round((w − offset) / scale), 0, 2^bits − 1) per group: uint8 (out, in)."""
    out_features, in_features = w.shape
    g = in_features // scale.shape[1]
    x = (w.float().view(out_features, -1, g) - offset[..., None]) / scale[..., None]
    return x.round_().clamp_(0, 2**bits - 1).to(torch.uint8).view(out_features, in_features)


def dequantize_grid(q: Tensor, scale: Tensor, offset: Tensor) -> Tensor:
    """W_q = scale · q + offset, float32 (out, in), from codes (out, in) and (out, in/g) scale, offset.

    The one place the grid is evaluated, in llama.cpp's order (a float32 product, then the add)."""
    out_features, in_features = q.shape
    w = q.view(out_features, scale.shape[1], -1).float().mul_(scale[..., None]).add_(offset[..., None])
    return w.view(out_features, in_features)


def group_sums(x: Tensor, group_size: int) -> Tensor:
    """S = Σ_{j∈G} x_j over each group G of `group_size` consecutive entries of the last dim: (..., in) ->
    (..., in/g). A group-constant offset change Δm reaches the output as S Δmᵀ (QA-LoRA on deployed offsets)."""
    return x.unflatten(-1, (-1, group_size)).sum(-1)


class IntNWeight(PackedWeight):
    """A frozen (out, in) weight in group-wise asymmetric INT-N form.

    Buffers (n = out·in):
        codes: uint8 (ceil(n·bits/8),)   q, bit-packed (`pack_codes`)
        scale:  float32 (out, in/group_size)
        offset: float32 (out, in/group_size)   in weight units (W = scale · q + offset)
    `dtype` is the dtype `dequantize()` returns by default (the original weight's).
    """

    def __init__(self, out_features: int, in_features: int, bits: int = 4, group_size: int = 32,
                 dtype: torch.dtype = torch.float32, device=None, offset_dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.offset_dtype = offset_dtype  # the precision offsets are deployed in (None: float32, exact)
        self.bits = check_bits(bits)
        self.group_size = check_group_size(group_size, in_features)
        self.shape = torch.Size((out_features, in_features))
        self.dtype = dtype
        n_groups = in_features // group_size
        self.register_buffer("codes", torch.zeros((out_features * in_features * bits + 7) // 8, dtype=torch.uint8, device=device))
        self.register_buffer("scale", torch.ones(out_features, n_groups, device=device))
        self.register_buffer("offset", torch.zeros(out_features, n_groups, device=device))

    @classmethod
    def from_codes(cls, codes: Tensor, scale: Tensor, offset: Tensor, bits: int,
                   dtype: torch.dtype = torch.float32, offset_dtype: torch.dtype | None = None) -> IntNWeight:
        """From unpacked codes uint8 (out, in) and float (out, in/g) scale and offset (GPTQ's, a GGUF file's)."""
        out_features, in_features = codes.shape
        if scale.shape != offset.shape or scale.shape[0] != out_features or in_features % scale.shape[1]:
            raise ValueError(f"scale {tuple(scale.shape)} and offset {tuple(offset.shape)} do not fit "
                             f"codes {tuple(codes.shape)}")
        if int(codes.max()) >= 2**bits:
            raise ValueError(f"codes reach {int(codes.max())}, beyond {bits}-bit range [0, {2**bits - 1}]")
        weight = cls(out_features, in_features, bits, in_features // scale.shape[1], dtype, codes.device, offset_dtype)
        weight.codes = pack_codes(codes, bits)
        weight.scale = scale.float().contiguous()
        weight.offset = offset.float().contiguous()
        return weight

    @classmethod
    def from_float(cls, w: Tensor, bits: int = 4, group_size: int = 32,
                   scale_dtype: torch.dtype = torch.float32) -> IntNWeight:
        """Round-to-nearest min-max quantization of w (out, in); scale and offset in `scale_dtype`'s values."""
        if w.dim() != 2 or not w.numel():
            raise ValueError(f"expected a non-empty 2-D (out, in) weight, got shape {tuple(w.shape)}")
        check_bits(bits)
        check_group_size(group_size, w.shape[1])
        if not torch.isfinite(w).all():
            raise ValueError(f"weight {tuple(w.shape)} has non-finite values (nan or inf), which have no place on "
                             "an INT-N grid; find where they came from (a diverged run, a bad checkpoint)")
        scale, offset = minmax_params(w.detach(), bits, group_size, scale_dtype)
        if not (torch.isfinite(scale).all() and torch.isfinite(offset).all()):
            row, group = (~torch.isfinite(scale + offset)).nonzero()[0].tolist()
            values = w[row, group * group_size: (group + 1) * group_size].float()
            name = str(scale_dtype).removeprefix("torch.")
            raise ValueError(
                f"weight {tuple(w.shape)}: row {row}, group {group} spans {values.min().item():.4g} to "
                f"{values.max().item():.4g}, beyond {name}'s range for a scale and offset "
                f"(±{torch.finfo(scale_dtype).max:.4g}); rescale the weight"
                + (" or keep scale_dtype=torch.float32" if scale_dtype != torch.float32 else "")
            )
        offset_dtype = None if scale_dtype == torch.float32 else scale_dtype
        return cls.from_codes(round_to_grid(w.detach(), scale, offset, bits), scale, offset, bits, w.dtype, offset_dtype)

    def q(self) -> Tensor:
        """The integer codes, uint8 (out, in)."""
        return unpack_codes(self.codes, self.bits, self.shape.numel()).view(self.shape)

    def dequantize(self, dtype: torch.dtype | None = None, moved: Tensor | None = None) -> Tensor:
        """W_q = scale · q + offset, (out, in), computed in float32 and cast once. `moved` (out, in/g), float32:
        the grid with every offset moved by it (offset + moved: what a merge of that offset change holds)."""
        offset = self.offset if moved is None else self.offset + moved
        dtype = dtype or self.dtype
        out_features, in_features = self.shape
        if dtype == torch.float32 or not self._whole_byte_rows() or not blockwise.chunked(
                self.shape.numel(), self.codes.device):
            return dequantize_grid(self.q(), self.scale, offset).to(dtype)
        # a large weight in bf16/fp16: rows of about CHUNK elements at a time (`blockwise.chunked`: 1.7-1.8x
        # for 2048 x 8192 INT4 to bf16; in float32 the result itself is the large buffer, and chunks were slower)
        out = torch.empty(self.shape, dtype=dtype, device=self.codes.device)
        step = max(blockwise.CHUNK // in_features, 1)
        for r in range(0, out_features, step):
            rows = slice(r, min(r + step, out_features))
            out[rows].copy_(self._rows(rows, offset))
        return out

    def _whole_byte_rows(self) -> bool:
        """Whether each row's codes are whole bytes of the stream (in·bits a multiple of 8): rows are then
        slices of bytes (`_rows`)."""
        return self.shape[1] * self.bits % 8 == 0

    def _rows(self, rows: slice, offset: Tensor) -> Tensor:
        """float32 Ŵ[rows] = scale · q + offset of those rows only (`dequantize_grid`, the whole weight's numbers)."""
        out_features, in_features = self.shape
        codes = self.codes[:out_features * in_features * self.bits // 8].view(out_features, -1)  # row bytes
        block = codes[rows]                                                                     # (r, in·bits/8)
        q = unpack_codes(block, self.bits, block.shape[0] * in_features).view(-1, in_features)
        return dequantize_grid(q, self.scale[rows], offset[rows])

    def moved_offset(self, delta: Tensor) -> Tensor:
        """The offset change a merge of δ (out, in/g) really makes, float32 (out, in/g):
        δ itself, or fp16(m + δ) − m when offsets are deployed in `offset_dtype`. Differentiable in δ
        with a straight-through gradient (d/dδ = 1)."""
        if self.offset_dtype is None:
            return delta
        moved = (self.offset + delta.detach()).to(self.offset_dtype).float() - self.offset
        return delta + (moved - delta).detach()

    def shift_offset_(self, delta: Tensor) -> None:
        """Add δ (out, in/g), a per-group constant update in weight units: offset ← offset + δ
        (rounded to `offset_dtype`'s values when set)."""
        if delta.shape != self.offset.shape:
            raise ValueError(f"a group-constant update must be {tuple(self.offset.shape)}, got {tuple(delta.shape)}")
        self.offset.add_(delta.to(self.offset))
        if self.offset_dtype is not None:  # what the deployed format holds (and what QA-LoRA trained against)
            self.offset.copy_(self.offset.to(self.offset_dtype))

    def extra_repr(self) -> str:
        extra = "" if self.offset_dtype is None else f", offset_dtype={str(self.offset_dtype).removeprefix('torch.')}"
        return (f"shape={tuple(self.shape)}, bits={self.bits}, group_size={self.group_size}, "
                f"bits_per_param={self.bits_per_param:.3f}{extra}")
