import mmap
import sys

import pytest

import lorakit.training.memory as memory
from lorakit.training.memory import PeakMemory, current_rss_bytes, peak_rss_bytes, reset_peak_rss

MB = 2**20
linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="VmHWM reset is Linux-only")


def touch(nbytes):
    """Map `nbytes` of anonymous memory, write every page (so it is resident), then unmap it. Straight from the
    OS: a malloc'd tensor can reuse pages the allocator kept resident from earlier tests in the same process,
    and then the RSS does not move at all (seen in the full suite)."""
    with mmap.mmap(-1, nbytes) as pages:
        for offset in range(0, nbytes, mmap.PAGESIZE):
            pages[offset] = 1


@linux_only
def test_reset_drops_the_peak_after_a_freed_allocation():
    touch(200 * MB)
    before = peak_rss_bytes()
    assert reset_peak_rss()
    after = peak_rss_bytes()
    assert after < before - 150 * MB
    assert after <= current_rss_bytes() + 8 * MB


@linux_only
def test_peak_memory_sees_an_allocation_inside_the_block():
    touch(200 * MB)  # an earlier, larger peak must not count
    with PeakMemory() as mem:
        touch(100 * MB)
    assert mem.reset_ok and mem.cuda_peak_bytes is None
    assert 90 * MB < mem.peak_rss_bytes - mem.start_rss_bytes < 180 * MB
    assert mem.end_rss_bytes < mem.peak_rss_bytes


def test_reset_reports_failure_instead_of_raising(monkeypatch, tmp_path):
    monkeypatch.setattr(memory, "_CLEAR_REFS", tmp_path / "missing" / "clear_refs")
    assert reset_peak_rss() is False
    with PeakMemory() as mem:
        pass
    assert mem.reset_ok is False and mem.peak_rss_bytes > 0


def test_without_proc_the_peak_comes_from_getrusage(monkeypatch, tmp_path):
    monkeypatch.setattr(memory, "_STATUS", tmp_path / "missing")
    assert peak_rss_bytes() > 10 * MB  # this process holds torch: tens of MB at least
