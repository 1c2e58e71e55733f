"""Stopping a child process of the server daemon: SIGTERM, a bounded wait, then SIGKILL."""

from __future__ import annotations

import subprocess


def stop_child(proc: subprocess.Popen, timeout: float) -> None:
    """Terminate ``proc`` and wait up to ``timeout`` s; kill it if it has not exited by then."""
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)
