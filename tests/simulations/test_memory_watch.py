"""The peak memory of a simulation counts the processes it started, not the driver alone."""

import subprocess
import sys

from simulations.memory_watch import PeakTreeMemory, tree_rss_bytes


def test_a_child_holding_memory_is_counted_in_the_tree():
    alone = tree_rss_bytes()
    hog = "import sys, time; b = bytearray(200 * 2**20); b[::4096] = b'x' * len(b[::4096]); print(1, flush=True); time.sleep(30)"
    child = subprocess.Popen([sys.executable, "-c", hog], stdout=subprocess.PIPE, text=True)
    try:
        with PeakTreeMemory(every=0.05) as peak:
            child.stdout.readline()
            assert tree_rss_bytes() > alone + 200 * 2**20
            import time

            time.sleep(0.3)
        assert peak.bytes > alone + 200 * 2**20
    finally:
        child.kill()
        child.wait()
        child.stdout.close()
