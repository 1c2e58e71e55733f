"""Ctrl-C and SIGTERM during ``fedsite simulate``: stop within seconds, leave no Ray process, say how to resume.

Flower's simulation engine runs the ServerApp on a thread and the virtual sites
on Ray; a KeyboardInterrupt in the main thread waits on that thread forever. A
stopped experiment loses nothing: every finished cell has its record and an
interrupted one its per-round checkpoints, so the same command continues.

Once Ray has started, its driver takes SIGTERM over (it exits within seconds
and its processes follow); the handler here then covers Ctrl-C and a SIGTERM
that arrives before or between federations.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from collections.abc import Callable
from types import FrameType

SHUTDOWN_TIMEOUT_S = 10.0


def _stop_ray() -> None:
    try:
        import ray

        if ray.is_initialized():
            ray.shutdown()
    except Exception:  # stopping anyway; Ray's own processes share the driver's fate
        pass


def install(resume_hint: str) -> Callable[[], None]:
    """Handle SIGINT/SIGTERM by shutting Ray down (bounded) and exiting 128 + signal; returns the uninstaller."""
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}

    def handler(signum: int, _frame: FrameType | None) -> None:
        print(f"\nfedsite simulate: stopped by signal {signum}; {resume_hint}", file=sys.stderr, flush=True)
        stopper = threading.Thread(target=_stop_ray, daemon=True)
        stopper.start()
        stopper.join(SHUTDOWN_TIMEOUT_S)
        os._exit(128 + signum)  # threads of the engine would block a normal exit

    for sig in previous:
        signal.signal(sig, handler)

    def uninstall() -> None:
        for sig, old in previous.items():
            signal.signal(sig, old)

    return uninstall
