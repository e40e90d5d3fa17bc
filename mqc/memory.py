"""Resident memory of this process: now, the peak of a stretch of work, and the peak of the run.

Linux keeps one high-water mark per process (``VmHWM``); writing ``5`` to ``/proc/self/clear_refs``
resets it, which is how the peak of one stage or one layer is measured. The peak of the whole run
is the largest mark seen, kept here, next to ``getrusage``'s.
"""

from __future__ import annotations

import os
import resource
from pathlib import Path

_seen = 0


def _status_kib(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def rss_bytes() -> int:
    kib = _status_kib("VmRSS")
    return 0 if kib is None else kib * 1024


def _hwm_bytes() -> int:
    kib = _status_kib("VmHWM")
    if kib is None:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return kib * 1024


def process_peak_bytes() -> int:
    """The largest resident size of this process so far."""
    global _seen
    _seen = max(_seen, _hwm_bytes(), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    return _seen


class PeakWindow:
    """``with PeakWindow() as w: ...`` then ``w.peak``: the resident peak inside the block (the
    process peak so far where the mark cannot be reset)."""

    def __enter__(self) -> PeakWindow:
        process_peak_bytes()
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        except OSError:
            pass
        self.peak = 0
        return self

    def __exit__(self, *exc) -> None:
        self.peak = _hwm_bytes()
        process_peak_bytes()


def cpu_count() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
