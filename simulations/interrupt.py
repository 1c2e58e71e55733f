"""Ctrl-C and SIGTERM during ``fedsite simulate``: stop within seconds, leave no Ray process, say how to resume.

Flower's simulation engine runs the ServerApp on a thread and the virtual sites
on Ray; a KeyboardInterrupt in the main thread waits on that thread forever. A
stopped experiment loses nothing: every finished cell has its record and an
interrupted one its per-round checkpoints, so the same command continues.

Once Ray has started, its driver takes SIGTERM over: its handler raises
``SystemExit(15)`` in the main thread. :func:`guard` turns that into the same
stop as ours (hint, bounded Ray shutdown, exit 128 + 15); the installed handler
covers Ctrl-C and a SIGTERM that arrives before or between federations.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from types import FrameType

SHUTDOWN_TIMEOUT_S = 10.0
_ACTIVE: list[Callable[[int, FrameType | None], None]] = []  # the handlers installed, innermost last
_ON_STOP: list[Callable[[], None]] = []  # what else a stop ends first (the workers of a parallel matrix)


def on_stop(action: Callable[[], None]) -> None:
    """Run ``action`` when a signal stops the experiment, before the process exits."""
    _ON_STOP.append(action)


def remove_on_stop(action: Callable[[], None]) -> None:
    if action in _ON_STOP:
        _ON_STOP.remove(action)


def _stop_ray() -> None:
    try:
        import ray

        if ray.is_initialized():
            ray.shutdown()
    except Exception:  # stopping anyway; Ray's own processes share the driver's fate
        pass


def stop(signum: int, resume_hint: str) -> None:
    """Say how to resume, shut Ray down (bounded) and exit 128 + ``signum``."""
    print(f"\nfedsite simulate: stopped by signal {signum}; {resume_hint}", file=sys.stderr, flush=True)
    for action in list(_ON_STOP):
        action()
    stopper = threading.Thread(target=_stop_ray, daemon=True)
    stopper.start()
    stopper.join(SHUTDOWN_TIMEOUT_S)
    os._exit(128 + signum)  # threads of the engine would block a normal exit


@contextlib.contextmanager
def guard(resume_hint: str) -> Iterator[None]:
    """Our handlers for the block, and Ray's SIGTERM exit inside it treated as our own stop."""
    uninstall = install(resume_hint)
    try:
        yield
    except SystemExit as exc:
        if exc.code == signal.SIGTERM:  # Ray's driver handler: sys.exit(signum)
            stop(signal.SIGTERM, resume_hint)
        raise
    finally:
        uninstall()


def install(resume_hint: str) -> Callable[[], None]:
    """Handle SIGINT/SIGTERM by shutting Ray down (bounded) and exiting 128 + signal; returns the uninstaller."""
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}

    def handler(signum: int, _frame: FrameType | None) -> None:
        stop(signum, resume_hint)

    for sig in previous:
        signal.signal(sig, handler)
    _ACTIVE.append(handler)

    def uninstall() -> None:
        _ACTIVE.remove(handler)
        for sig, old in previous.items():
            signal.signal(sig, old)

    return uninstall


def reassert() -> None:
    """Put the installed handler back after a library (Ray's core worker) took SIGTERM/SIGINT over."""
    if _ACTIVE and threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, _ACTIVE[-1])
