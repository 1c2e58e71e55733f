"""Children of a daemon and everything they start, stopped as a whole.

The SuperLink starts Flower's SuperExec (in a session of its own) and that the
ServerApp runner; the site's task gate starts ClientApp runners. When the daemon
stops, none of them may outlive it: the processes below a child are recorded
before it is signalled (once it has exited they would belong to init), the child
is stopped gracefully, then whatever it left behind is ended too.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from contextlib import suppress

LEFTOVER_GRACE_S = 5.0  # what a grandchild gets between SIGTERM and SIGKILL once its parent is gone

Process = tuple[int, int]  # (pid, start time in clock ticks): a pid reused by a newer process is not ours


def start_child(cmd: list[str], **popen_kwargs) -> subprocess.Popen:
    """``subprocess.Popen`` in a session of its own: a terminal's Ctrl-C reaches the daemon, which stops it in order."""
    return subprocess.Popen(cmd, start_new_session=True, **popen_kwargs)


def stop_child(proc: subprocess.Popen, timeout: float) -> None:
    """SIGTERM ``proc``, wait up to ``timeout`` s (SIGKILL after), then end every process it had started."""
    below = descendants(proc.pid) if proc.poll() is None else []
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
    end_processes(below)


def end_processes(processes: list[Process], grace: float = LEFTOVER_GRACE_S) -> None:
    """SIGTERM each of ``processes`` still running, SIGKILL those still there after ``grace`` s."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        running = [p for p in processes if _running(p)]
        for pid, _ in running:
            with suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.monotonic() + grace
        while running and time.monotonic() < deadline:
            time.sleep(0.1)
            running = [p for p in running if _running(p)]
        if not running:
            return


def descendants(pid: int) -> list[Process]:
    """Every process below ``pid`` now, whatever its session (Linux ``/proc``; elsewhere none)."""
    children: dict[int, list[Process]] = {}
    for child, (ppid, start, _) in _process_table().items():
        children.setdefault(ppid, []).append((child, start))
    out, todo = [], [pid]
    while todo:
        below = children.get(todo.pop(), [])
        out.extend(below)
        todo.extend(child for child, _ in below)
    return out


def _process_table() -> dict[int, tuple[int, int, str]]:
    """pid -> (parent pid, start time, state) of every process."""
    if not os.path.isdir("/proc"):
        return {}
    table = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit() and (stat := _stat(int(entry))):
            table[int(entry)] = stat
    return table


def _stat(pid: int) -> tuple[int, int, str] | None:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return int(fields[1]), int(fields[19]), fields[0]


def _running(process: Process) -> bool:
    stat = _stat(process[0])
    return stat is not None and stat[1] == process[1] and stat[2] != "Z"
