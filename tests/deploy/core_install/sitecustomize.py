"""Make this interpreter look like a ``fedsite[site]`` install: Ray and matplotlib absent.

The deployment tests put this folder first on PYTHONPATH for every site and server
process (the daemons, the SuperLink, the SuperNodes and the apps they run), so a
deployed code path that imports either fails the test as it would at a hospital.
"""

import importlib.abc
import sys

ABSENT = ("ray", "matplotlib")


class _Absent(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in ABSENT:
            raise ModuleNotFoundError(f"No module named {name!r} (not in fedsite's core dependencies)", name=name)
        return None


if __name__ == "sitecustomize":  # only as the interpreter's start-up hook, never when a test imports ABSENT
    sys.meta_path.insert(0, _Absent())
