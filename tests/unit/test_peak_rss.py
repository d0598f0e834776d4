"""Peak resident memory per window (a sweep's cell, a pruning stage): nested windows, each reset of
Linux's high-water mark folded into the windows still open, the process's peak kept."""

from __future__ import annotations

import mmap
import os

import pytest

from alsparse.report import StageTimer, peak_rss_gib, peak_rss_window

MB = 2**20
RESETTABLE = os.access("/proc/self/clear_refs", os.W_OK)


def _touch(nbytes: int) -> mmap.mmap:
    """Resident memory that ``close()`` certainly hands back: an anonymous mapping with every page
    written (a malloc'd tensor may stay resident after it is freed, depending on the allocator's
    state, which other tests in the same process change)."""
    block = mmap.mmap(-1, nbytes)
    for offset in range(0, nbytes, mmap.PAGESIZE):
        block[offset] = 1
    return block


@pytest.mark.skipif(not RESETTABLE, reason="needs Linux's /proc/self/clear_refs")
def test_nested_windows_and_stage_peaks():
    big = 300 * MB / 2**30
    timer = StageTimer()
    with peak_rss_window() as outer:
        with timer("heavy"):
            _touch(300 * MB).close()
        with timer("light"):  # starts after the buffer is freed: its own peak excludes it
            _touch(8 * MB).close()
        after_stages = peak_rss_gib()  # inside the outer window: its peak so far
    heavy, light = timer.peak_rss_gib["heavy"], timer.peak_rss_gib["light"]
    assert heavy - light > 0.8 * big, (heavy, light)
    assert outer[0] >= heavy and after_stages >= heavy, "the outer window keeps the inner stages' peaks"
    assert peak_rss_gib() >= heavy, "the process's peak survives the resets"
    assert timer.timings["heavy"] > 0 and set(timer.timings) == {"heavy", "light"}


def test_a_stage_entered_twice_keeps_its_larger_peak_and_adds_its_times():
    timer = StageTimer()
    with timer("stage"):
        _touch(200 * MB).close()
    first_peak, first_time = timer.peak_rss_gib["stage"], timer.timings["stage"]
    with timer("stage"):
        pass
    assert timer.peak_rss_gib["stage"] == first_peak
    assert timer.timings["stage"] >= first_time
