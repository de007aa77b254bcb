"""Group-wise asymmetric INT-N weights: QA-LoRA's frozen base (and llama.cpp's Q4_1 / Q5_1 block).

A weight W (out, in) is quantized per output row in groups of `group_size` consecutive input
columns (in % group_size == 0). For row i and group G = j // group_size:

    W_q[i, j] = scale[i, G] · (q[i, j] − zero[i, G]),   q ∈ {0, …, 2^bits − 1},  bits ∈ {2, 3, 4, 5, 8}

with float32 `scale` and float32 `zero` (a float zero, so an offset can move by any amount: that
is what makes QA-LoRA's merge exact). Round-to-nearest (RTN) min-max quantization of a group x:

    scale = (max x − min x) / (2^bits − 1),  zero = −min x / scale,  q = clamp(round(x / scale + zero))

so the group's min and max are on the grid (q = 0 and q = 2^bits − 1). A constant group takes
scale = 1, zero = −x (exact). A QA-LoRA update that is constant inside each group,
ΔW[i, j] = δ[i, G], merges by moving only the zeros: zero[i, G] ← zero[i, G] − δ[i, G] / scale[i, G].

Storage: the codes are a bit stream, `bits` bits per weight, least significant bit first, in
row-major order (`pack_codes` / `unpack_codes`); 2, 4 and 8 bits take a fast path.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

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
    """The inverse of `pack_codes`: uint8 (ceil(n·bits/8),) -> uint8 codes (n,)."""
    if 8 % bits == 0:
        per = 8 // bits
        shifts = torch.arange(per, dtype=torch.uint8, device=packed.device) * bits
        return ((packed[:, None] >> shifts) & ((1 << bits) - 1)).reshape(-1)[:n]
    stream = (packed[:, None] >> torch.arange(8, dtype=torch.uint8, device=packed.device)) & 1  # (m, 8)
    bit_values = stream.reshape(-1)[: n * bits].view(n, bits).to(torch.int32)
    return (bit_values << torch.arange(bits, device=packed.device, dtype=torch.int32)).sum(dim=1).to(torch.uint8)


def minmax_params(w: Tensor, bits: int, group_size: int) -> tuple[Tensor, Tensor]:
    """RTN min-max scale and zero of each (row, group) of w (out, in): two float32 (out, in/g)."""
    out_features, in_features = w.shape
    groups = w.float().view(out_features, in_features // group_size, group_size)
    lo, hi = groups.amin(dim=2), groups.amax(dim=2)
    flat = hi == lo
    scale = torch.where(flat, torch.ones_like(lo), (hi - lo) / (2**bits - 1))
    zero = -lo / scale
    return scale, zero


def round_to_grid(w: Tensor, scale: Tensor, zero: Tensor, bits: int) -> Tensor:
    """q = clamp(round(w / scale + zero), 0, 2^bits − 1) per group: uint8 (out, in)."""
    out_features, in_features = w.shape
    g = in_features // scale.shape[1]
    x = w.float().view(out_features, -1, g) / scale[..., None] + zero[..., None]
    return x.round_().clamp_(0, 2**bits - 1).to(torch.uint8).view(out_features, in_features)


class IntNWeight(PackedWeight):
    """A frozen (out, in) weight in group-wise asymmetric INT-N form.

    Buffers (n = out·in):
        codes: uint8 (ceil(n·bits/8),)   q, bit-packed (`pack_codes`)
        scale: float32 (out, in/group_size)
        zero:  float32 (out, in/group_size)   float offsets in code units
    `dtype` is the dtype `dequantize()` returns by default (the original weight's).
    """

    def __init__(self, out_features: int, in_features: int, bits: int = 4, group_size: int = 32,
                 dtype: torch.dtype = torch.float32, device=None) -> None:
        super().__init__()
        self.bits = check_bits(bits)
        self.group_size = check_group_size(group_size, in_features)
        self.shape = torch.Size((out_features, in_features))
        self.dtype = dtype
        n_groups = in_features // group_size
        self.register_buffer("codes", torch.zeros((out_features * in_features * bits + 7) // 8, dtype=torch.uint8, device=device))
        self.register_buffer("scale", torch.ones(out_features, n_groups, device=device))
        self.register_buffer("zero", torch.zeros(out_features, n_groups, device=device))

    @classmethod
    def from_codes(cls, codes: Tensor, scale: Tensor, zero: Tensor, bits: int, dtype: torch.dtype = torch.float32) -> IntNWeight:
        """From unpacked codes uint8 (out, in) and float (out, in/g) scale and zero (e.g. GPTQ's)."""
        out_features, in_features = codes.shape
        if scale.shape != zero.shape or scale.shape[0] != out_features or in_features % scale.shape[1]:
            raise ValueError(f"scale {tuple(scale.shape)} and zero {tuple(zero.shape)} do not fit codes {tuple(codes.shape)}")
        if int(codes.max()) >= 2**bits:
            raise ValueError(f"codes reach {int(codes.max())}, beyond {bits}-bit range [0, {2**bits - 1}]")
        weight = cls(out_features, in_features, bits, in_features // scale.shape[1], dtype, codes.device)
        weight.codes = pack_codes(codes, bits)
        weight.scale = scale.float().contiguous()
        weight.zero = zero.float().contiguous()
        return weight

    @classmethod
    def from_float(cls, w: Tensor, bits: int = 4, group_size: int = 32) -> IntNWeight:
        """Round-to-nearest min-max quantization of w (out, in)."""
        if w.dim() != 2:
            raise ValueError(f"expected a 2-D (out, in) weight, got shape {tuple(w.shape)}")
        check_bits(bits)
        check_group_size(group_size, w.shape[1])
        scale, zero = minmax_params(w.detach(), bits, group_size)
        return cls.from_codes(round_to_grid(w.detach(), scale, zero, bits), scale, zero, bits, w.dtype)

    def q(self) -> Tensor:
        """The integer codes, uint8 (out, in)."""
        return unpack_codes(self.codes, self.bits, self.shape.numel()).view(self.shape)

    def dequantize(self, dtype: torch.dtype | None = None) -> Tensor:
        """W_q = scale · (q − zero), (out, in), computed in float32 and cast once."""
        out_features, in_features = self.shape
        q = self.q().view(out_features, -1, self.group_size).float()
        w = (q - self.zero[..., None]).mul_(self.scale[..., None])
        return w.view(self.shape).to(dtype or self.dtype)

    def shift_zero_(self, delta: Tensor) -> None:
        """Add δ (out, in/g), a per-group constant update in weight units: zero ← zero − δ / scale."""
        if delta.shape != self.zero.shape:
            raise ValueError(f"a group-constant update must be {tuple(self.zero.shape)}, got {tuple(delta.shape)}")
        self.zero.sub_(delta.float() / self.scale)

    def extra_repr(self) -> str:
        return (f"shape={tuple(self.shape)}, bits={self.bits}, group_size={self.group_size}, "
                f"bits_per_param={self.bits_per_param:.3f}")
