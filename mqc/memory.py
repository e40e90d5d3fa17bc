"""Resident memory of this process: now, the peak of a stretch of work, and the peak of the run.

The kernel keeps one high-water mark per process (what ``getrusage`` and ``/usr/bin/time``
report); resetting it to time a stage would falsify the run's peak. So the peak of a stage or a
layer (:class:`PeakWindow`) is sampled instead: a background thread reads the resident size every
:data:`SAMPLE_SECONDS` while a window is open (a shorter spike can be missed; the run's peak
never is, it is the kernel's).
"""

from __future__ import annotations

import os
import resource
import threading
import time

SAMPLE_SECONDS = 0.01
_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def rss_bytes() -> int:
    """The resident size now."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * _PAGE
    except OSError:
        return 0


def process_peak_bytes() -> int:
    """The largest resident size of this process so far (the kernel's high-water mark)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class _Sampler:
    """One thread for every open window: each sample raises the peak of every window."""

    def __init__(self) -> None:
        self.windows: list[PeakWindow] = []
        self.lock = threading.Lock()
        self.thread: threading.Thread | None = None

    def add(self, window: PeakWindow) -> None:
        with self.lock:
            self.windows.append(window)
            if self.thread is None or not self.thread.is_alive():
                self.thread = threading.Thread(target=self._run, name="mqc-rss", daemon=True)
                self.thread.start()

    def remove(self, window: PeakWindow) -> None:
        with self.lock:
            self.windows.remove(window)

    def _run(self) -> None:
        while True:
            with self.lock:
                if not self.windows:
                    self.thread = None
                    return
                now = rss_bytes()
                for window in self.windows:
                    window.peak = max(window.peak, now)
            time.sleep(SAMPLE_SECONDS)


_sampler = _Sampler()


class PeakWindow:
    """``with PeakWindow() as w: ...`` then ``w.peak``: the largest resident size sampled inside
    the block (windows nest freely)."""

    def __enter__(self) -> PeakWindow:
        self.peak = rss_bytes()
        _sampler.add(self)
        return self

    def __exit__(self, *exc) -> None:
        _sampler.remove(self)
        self.peak = max(self.peak, rss_bytes())
