"""Which device to train on, and which compute dtype suits it.

The compute dtype is the dtype of activations and matmuls (frozen quantized weights are
dequantized to it). It is a property of the hardware, not of the model:

- CPU: bf16 only where the CPU multiplies bf16 natively (x86 ``avx512_bf16`` / ``amx_bf16``,
  Arm ``bf16``) *and* a timed matmul confirms PyTorch uses it; otherwise fp32. Without native
  support a bf16 matmul is emulated, about 300x slower than fp32 (0.28 vs 94 GFLOP/s measured
  on an AVX2 laptop-class CPU).
- CUDA: bf16 where `torch.cuda.is_bf16_supported()` (Ampere and later), else fp16 (which
  needs loss scaling in the training loop).
- MPS: fp32. bf16 depends on the macOS version and fp16 needs loss scaling; fp16 is one
  ``compute_dtype="fp16"`` away.
- Anything else: fp32.
"""

from __future__ import annotations

import functools
import time
from pathlib import Path

import torch

_DTYPE_NAMES = {
    "fp32": torch.float32,
    "float32": torch.float32,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
}
_NATIVE_BF16_FLAGS = {"avx512_bf16", "amx_bf16", "bf16"}  # x86 (AVX-512, AMX), Arm (FEAT_BF16)
_FAST_ENOUGH = 0.5  # bf16 counts as fast when it runs at least half as fast as fp32


def cpu_flags() -> set[str] | None:
    """The CPU's feature flags from /proc/cpuinfo (``flags`` on x86, ``Features`` on Arm).

    None where /proc/cpuinfo does not exist (macOS, Windows): the flags are then unknown.
    """
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return set(value.split())
    return set()


def _matmul_seconds(dtype: torch.dtype, n: int = 256, repeats: int = 3) -> float:
    """Best-of-`repeats` wall time of one (n x n) @ (n x n) matmul in `dtype` on the CPU."""
    a = torch.randn(n, n).to(dtype)
    b = torch.randn(n, n).to(dtype)
    a @ b  # warm-up: first call may pick kernels / allocate
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return best


@functools.cache
def bf16_probe() -> dict:
    """What `cpu_has_fast_bf16` decides from: the CPU's native bf16 flags (None: flags unknown), and, where
    the flags allow bf16, the timed 256 x 256 matmul in fp32 and bf16 (seconds, best of 3). Once per process."""
    flags = cpu_flags()
    native = None if flags is None else sorted(flags & _NATIVE_BF16_FLAGS)
    if native == []:
        return {"native_flags": native, "fp32_s": None, "bf16_s": None, "fast": False}
    fp32, bf16 = _matmul_seconds(torch.float32), _matmul_seconds(torch.bfloat16)
    return {"native_flags": native, "fp32_s": fp32, "bf16_s": bf16, "fast": bf16 * _FAST_ENOUGH <= fp32}


def cpu_has_fast_bf16() -> bool:
    """True when this CPU multiplies bf16 natively and PyTorch's bf16 matmul is not slower
    than half the fp32 speed.

    Detected, not assumed: the CPU flags (`cpu_flags`) must name native bf16 instructions, and a
    timed 256 x 256 matmul (once per process; under 0.5 s even where bf16 is emulated) must
    confirm that the kernels PyTorch dispatches to use them. Where the flags are unknown (no /proc/cpuinfo) the timing
    alone decides.
    """
    return bf16_probe()["fast"]


def compute_dtype_reason(device: torch.device | str | None = None) -> str:
    """Why `default_compute_dtype(device)` picks what it picks, in one line (for `lorakit env`)."""
    device = torch.device(device) if device is not None else default_device()
    if device.type == "cuda":
        return ("bf16 supported by this GPU" if torch.cuda.is_bf16_supported()
                else "this GPU has no bf16 (before Ampere): fp16 with loss scaling")
    if device.type != "cpu":
        return f"{device.type}: float32 (bf16 support varies; fp16 needs loss scaling)"
    probe = bf16_probe()
    if probe["native_flags"] == []:
        return "no native bf16 in the CPU flags (avx512_bf16 / amx_bf16 / bf16): emulated bf16 is ~300x slower"
    gflops = {k: 2 * 256**3 / probe[f"{k}_s"] / 1e9 for k in ("fp32", "bf16")}
    timed = f"256x256 matmul: bf16 {gflops['bf16']:.1f} vs fp32 {gflops['fp32']:.1f} GFLOP/s"
    flags = "flags unknown" if probe["native_flags"] is None else "CPU flags " + ", ".join(probe["native_flags"])
    verdict = "bf16 is fast" if probe["fast"] else f"bf16 under {_FAST_ENOUGH:.0%} of fp32 speed: float32"
    return f"{flags}; {timed}; {verdict}"


def default_device() -> torch.device:
    """CUDA if available, else Apple MPS if available, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda")
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def default_compute_dtype(device: torch.device | str | None = None) -> torch.dtype:
    """The compute dtype for `device` (default: `default_device()`); see the module docstring."""
    device = torch.device(device) if device is not None else default_device()
    if device.type == "cpu":
        return torch.bfloat16 if cpu_has_fast_bf16() else torch.float32
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def resolve_compute_dtype(
    value: str | torch.dtype | None, device: torch.device | str | None = None
) -> torch.dtype:
    """A user's compute dtype choice as a `torch.dtype`.

    `value` is None or ``"auto"`` (the hardware's choice, `default_compute_dtype(device)`), one of
    ``"fp32"``/``"float32"``, ``"bf16"``/``"bfloat16"``, ``"fp16"``/``"float16"`` (any case), or
    one of those three torch dtypes.
    """
    if value is None or (isinstance(value, str) and value.strip().lower() == "auto"):
        return default_compute_dtype(device)
    if isinstance(value, torch.dtype):
        if value not in _DTYPE_NAMES.values():
            raise ValueError(
                f"compute dtype {value} is not supported; use torch.float32, torch.bfloat16 or "
                f"torch.float16 (or 'auto')"
            )
        return value
    if isinstance(value, str) and value.strip().lower() in _DTYPE_NAMES:
        return _DTYPE_NAMES[value.strip().lower()]
    raise ValueError(
        f"unknown compute dtype {value!r}; use 'auto' or one of {', '.join(map(repr, _DTYPE_NAMES))}"
    )


def cast_base_(model: torch.nn.Module, dtype: str | torch.dtype | None = "auto",
               device: torch.device | str | None = None) -> torch.dtype:
    """Put the frozen base in the compute dtype; trainable parameters stay float32; return the dtype.

    Frozen floating-point parameters and buffers are cast ("auto" = `default_compute_dtype`); a
    quantized weight keeps its codes and only dequantizes to the new dtype. Parameters that train
    (adapters, modules_to_save) keep float32 master values: the adapter layers cast them to the
    input's dtype in forward, so the optimizer updates float32 numbers.
    """
    target = resolve_compute_dtype(dtype, device)
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    model.to(target)
    for p in model.parameters():
        if id(p) in trainable and p.dtype != torch.float32:
            p.data = p.data.float()
    return target
