"""Measuring the memory a piece of work adds to a process (for benchmarks and tests).

``PeakMemory`` samples the process's *anonymous* resident memory (``RssAnon``
in ``/proc/self/status``: heap and tensor storage, not the page cache of files
it reads or memory-maps) from a thread, every half millisecond, and reports the
peak above what it held when the measurement began. That is what a checkpoint
save or load costs a rank in RAM: a tensor gathered onto it, or copies made for
writing, show up; a memory-mapped shard file that is read does not, because the
kernel can drop those pages at any time. Linux only; elsewhere ``available`` is
false and the peak stays 0. On a GPU, ``torch.cuda.max_memory_allocated`` is
the measure instead, and a caller reads it itself.
"""

from __future__ import annotations

import threading
import time

_STATUS = "/proc/self/status"


def rss_anon() -> int | None:
    """This process's anonymous resident memory in bytes, or None where unknown."""
    try:
        with open(_STATUS) as f:
            for line in f:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


class PeakMemory:
    """``with PeakMemory() as m: work()``; then ``m.peak_extra`` is the most anonymous
    memory the process held above its level at the start, in bytes."""

    def __init__(self, interval_s: float = 0.0005):
        self.interval_s = interval_s
        self.available = rss_anon() is not None
        self.start = self.peak = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> "PeakMemory":
        if self.available:
            self.start = self.peak = rss_anon()
            self._thread = threading.Thread(target=self._sample, name="peak-memory",
                                            daemon=True)
            self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.is_set():
            now = rss_anon()
            if now is not None and now > self.peak:
                self.peak = now
            time.sleep(self.interval_s)

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            now = rss_anon()
            if now is not None and now > self.peak:
                self.peak = now

    @property
    def peak_extra(self) -> int:
        return max(0, self.peak - self.start)
