"""lorakit.training.allocator: glibc's malloc keeps freed memory (checked by what malloc does, in a fresh process)."""

import os
import subprocess
import sys

import pytest

PROBE = r"""
import ctypes, sys
from lorakit.training.allocator import describe, keep_freed_memory

libc = ctypes.CDLL("libc.so.6")
modern = hasattr(libc, "mallinfo2")  # glibc >= 2.33; mallinfo's int fields hold 20 MiB as well

class MallInfo(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t if modern else ctypes.c_int) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]

mallinfo = libc.mallinfo2 if modern else libc.mallinfo
mallinfo.restype = MallInfo
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
set_ = keep_freed_memory() if sys.argv[1] == "keep" else False
before = mallinfo().hblkhd
p = libc.malloc(20 << 20)  # 20 MiB: over glibc's first mmap threshold (128 KiB), under 32 MiB
mapped = mallinfo().hblkhd - before
libc.free(p)
print(set_, mapped)
print(describe())
"""


def _probe(mode: str, **env) -> tuple[str, int, str]:
    out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True,
                         env={**os.environ, **env}).stdout.splitlines()
    set_, mapped = out[0].split()
    return set_, int(mapped), out[1]


@pytest.mark.skipif(not sys.platform.startswith("linux") or "malloc" in os.environ.get("LD_PRELOAD", ""),
                    reason="glibc's malloc on Linux only")
def test_a_large_allocation_comes_from_the_heap_once_malloc_keeps_freed_memory():
    set_, mapped, line = _probe("plain")
    assert set_ == "False" and mapped >= 20 << 20  # glibc's default: a fresh mapping, handed back on free
    assert line.endswith(", its own thresholds")
    set_, mapped, line = _probe("keep")
    assert (set_, mapped) == ("True", 0)  # from the heap, whose freed memory stays for the next request
    assert line.startswith("glibc ") and line.endswith("keeps freed memory (LORAKIT_MALLOC=system leaves it alone)")
    set_, mapped, line = _probe("keep", LORAKIT_MALLOC="system")
    assert set_ == "False" and mapped >= 20 << 20  # the way to leave malloc alone
    assert line.endswith("left alone (LORAKIT_MALLOC=system)")
