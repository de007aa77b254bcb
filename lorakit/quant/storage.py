"""The plumbing every quantized weight module shares (`PackedWeight`), and what `module.to(...)`
means for one: device moves apply to its buffers, float casts (`model.half()`,
`model.to(torch.bfloat16)`) only change the dtype it dequantizes to. Its float32 constants
(absmax, scale, offset) are part of the format and keep their precision."""

from __future__ import annotations

import torch
from torch import nn


def apply_keeping_format(module: nn.Module, fn) -> nn.Module:
    """`nn.Module._apply` for a quantized weight with `dtype` and `device` attributes."""
    probe = fn(torch.empty(0, dtype=module.dtype, device=module.device))
    if probe.is_floating_point():
        module.dtype = probe.dtype
    for name, buf in module._buffers.items():
        moved = fn(buf)
        module._buffers[name] = moved if moved.dtype == buf.dtype else buf.to(moved.device)
    return module


class PackedWeight(nn.Module):
    """Base of the quantized weight value objects: buffers only, plus `shape`, `dtype` and
    `dequantize(dtype) -> (out, in)` defined by each format."""

    @property
    def device(self) -> torch.device:
        return self.codes.device

    @property
    def nbytes(self) -> int:
        """Storage bytes of all buffers."""
        return sum(b.numel() * b.element_size() for b in self.buffers())

    @property
    def bits_per_param(self) -> float:
        return 8 * self.nbytes / max(self.shape.numel(), 1)

    def _apply(self, fn, recurse=True):
        return apply_keeping_format(self, fn)
