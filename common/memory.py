"""Process memory figures reported next to results."""

from __future__ import annotations

import resource
import threading
from types import TracebackType

import psutil

SAMPLE_SECONDS = 0.05


def peak_rss_bytes() -> int:
    """The most resident memory this process has held so far (Linux reports ru_maxrss in KiB)."""
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


class PeakRss:
    """The most resident memory seen while a block runs, sampled on a thread.

    A long-lived daemon's `ru_maxrss` is its lifetime peak; this is one piece of work's (the models it holds count,
    as they are resident while it runs).
    """

    def __init__(self, interval: float = SAMPLE_SECONDS):
        self.interval = interval
        self.peak = 0
        self._process = psutil.Process()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while True:
            self.peak = max(self.peak, self._process.memory_info().rss)
            if self._stop.wait(self.interval):
                return

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._process.memory_info().rss)
