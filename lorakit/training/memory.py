"""Resident memory of this process: now, at its peak, and the peak over a block of code.

On Linux, /proc/self/status gives the resident set size now (``VmRSS``) and its high-water mark
(``VmHWM``), and writing ``5`` to /proc/self/clear_refs resets the high-water mark to the current
RSS, so the peak of a training step can be measured after a model is loaded. Elsewhere the peak
comes from `resource.getrusage` (since the process started: it cannot be reset) and the current
RSS from psutil when it is installed. Functions that cannot measure say so in their return value.

On CUDA, `PeakMemory` also reports `torch.cuda.max_memory_allocated` (tensor memory, not
the caching allocator's reserve), reset on enter.
"""

from __future__ import annotations

import gc
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


def _status_bytes(field: str) -> int | None:
    """A ``kB`` field of /proc/self/status (``VmRSS``, ``VmHWM``) in bytes; None off Linux."""
    try:
        text = _STATUS.read_text()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    return None


def current_rss_bytes() -> int | None:
    """Resident set size now, in bytes; None where neither /proc nor psutil is available."""
    rss = _status_bytes("VmRSS")
    if rss is not None:
        return rss
    try:
        import psutil
    except ImportError:
        return None
    return psutil.Process().memory_info().rss


def peak_rss_bytes() -> int:
    """High-water mark of the resident set size, in bytes, since start or the last
    successful `reset_peak_rss()`."""
    peak = _status_bytes("VmHWM")
    if peak is not None:
        return peak
    import resource

    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return maxrss if sys.platform == "darwin" else maxrss * 1024  # bytes on macOS, kB elsewhere


def peak_memory_bytes(device: torch.device | str | None = None) -> int:
    """The memory peak a training run reports: `torch.cuda.max_memory_allocated` (tensor memory) on a
    CUDA device, else this process's RSS high-water mark (`peak_rss_bytes`)."""
    device = torch.device(device) if device is not None else None
    if device is not None and device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return peak_rss_bytes()


def reset_peak_rss() -> bool:
    """Reset the RSS high-water mark to the current RSS. True if it was reset; False where the
    OS does not allow it (not Linux, or /proc/self/clear_refs not writable): `peak_rss_bytes()`
    then keeps counting from process start."""
    try:
        _CLEAR_REFS.write_text("5")
    except OSError:
        return False
    return True


@dataclass
class PeakMemory:
    """Peak memory over a ``with`` block::

        with PeakMemory(device) as mem:
            train_step()
        print(mem.peak_rss_bytes, mem.reset_ok, mem.cuda_peak_bytes)

    On enter: garbage-collects, resets the RSS high-water mark (`reset_ok` records whether that
    worked; if not, `peak_rss_bytes` is the peak since process start) and, when `device` is CUDA,
    the CUDA peak statistics. On exit: records `peak_rss_bytes`, `end_rss_bytes`, and
    `cuda_peak_bytes` (None unless `device` is CUDA). `start_rss_bytes` is the RSS on enter.
    """

    device: torch.device | str | None = None
    reset_ok: bool = False
    start_rss_bytes: int | None = None
    peak_rss_bytes: int | None = None
    end_rss_bytes: int | None = None
    cuda_peak_bytes: int | None = None

    def _cuda(self) -> torch.device | None:
        device = torch.device(self.device) if self.device is not None else None
        return device if device is not None and device.type == "cuda" else None

    def __enter__(self) -> PeakMemory:
        gc.collect()
        cuda = self._cuda()
        if cuda is not None:
            torch.cuda.synchronize(cuda)
            torch.cuda.reset_peak_memory_stats(cuda)
        self.reset_ok = reset_peak_rss()
        self.start_rss_bytes = current_rss_bytes()
        return self

    def __exit__(self, *exc_info) -> None:
        cuda = self._cuda()
        if cuda is not None:
            torch.cuda.synchronize(cuda)
            self.cuda_peak_bytes = torch.cuda.max_memory_allocated(cuda)
        self.peak_rss_bytes = peak_rss_bytes()
        self.end_rss_bytes = current_rss_bytes()
