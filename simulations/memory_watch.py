"""Peak memory of a simulation: the resident memory of this process and all it started (Ray's workers), sampled.

Ray runs each simulated site in a worker process, so the driver's own peak says little
about what a federation of many sites needs; the sum over the process tree does.
Linux only (``/proc``); elsewhere the peak stays 0.
"""

from __future__ import annotations

import os
import threading
from types import TracebackType

from shared_models.child_process import descendants

SAMPLE_S = 0.5
_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def tree_rss_bytes(pid: int | None = None) -> int:
    """Resident bytes of ``pid`` (default: this process) and every process below it, now."""
    pid = os.getpid() if pid is None else pid
    return sum(_rss(p) for p in [pid, *(child for child, _ in descendants(pid))])


def _rss(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/statm") as fh:
            return int(fh.read().split()[1]) * _PAGE
    except (OSError, IndexError, ValueError):
        return 0


class PeakTreeMemory:
    """``with PeakTreeMemory() as peak: ...`` then ``peak.bytes``: the largest sum seen while the block ran."""

    def __init__(self, every: float = SAMPLE_S):
        self.every, self.bytes = every, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="fedsite-memory", daemon=True)

    def _watch(self) -> None:
        while True:
            self.bytes = max(self.bytes, tree_rss_bytes())
            if self._stop.wait(self.every):
                return

    def __enter__(self) -> PeakTreeMemory:
        if os.path.isdir("/proc"):
            self._thread.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(2 * self.every + 1)
