"""What `module.to(...)` means for a quantized weight: device moves apply to its buffers, float
casts (`model.half()`, `model.to(torch.bfloat16)`) only change the dtype it dequantizes to. Its
float32 constants (absmax, scale, zero) are part of the format and keep their precision."""

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
