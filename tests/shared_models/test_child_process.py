"""A stopped child takes down what it started, even a grandchild in a session of its own (as Flower's SuperExec)."""

import subprocess
import sys
import time

from shared_models.child_process import descendants, end_processes, start_child, stop_child

# The child starts a detached grandchild that ignores SIGTERM, prints its pid and waits; it exits on SIGTERM itself.
CHILD = """
import signal, subprocess, sys, time
grand = subprocess.Popen([sys.executable, "-c", "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(120)"],
                         start_new_session=True)
print(grand.pid, flush=True)
time.sleep(120)
"""


def _running(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_stopping_a_child_ends_its_detached_grandchild_that_ignores_sigterm():
    child = start_child([sys.executable, "-c", CHILD], stdout=subprocess.PIPE, text=True)
    grand = int(child.stdout.readline())
    assert [pid for pid, _ in descendants(child.pid)] == [grand]
    t0 = time.monotonic()
    stop_child(child, timeout=10)
    assert child.returncode is not None and not _running(grand)
    assert time.monotonic() - t0 < 10  # SIGTERM to the child, then the grandchild's grace and SIGKILL
    child.stdout.close()


def test_a_reused_pid_is_not_signalled():
    bystander = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        (pid, start), = [(bystander.pid, 0)]  # a start time that is not this process's
        end_processes([(pid, start)], grace=0.2)
        assert bystander.poll() is None
    finally:
        bystander.kill()
        bystander.wait()
