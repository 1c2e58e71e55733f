"""Find Flower's console scripts next to the running interpreter.

A daemon started as ``.venv/bin/python -m ...`` (systemd, cron, CI) has no
activated virtual environment, so ``flower-superlink`` and ``flower-superexec``
are not on ``PATH`` although they were installed beside this interpreter.
Child processes get that folder first on their ``PATH``.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path


def interpreter_bin() -> Path:
    """The folder holding this interpreter and the console scripts installed with it."""
    return Path(sys.executable).parent


def env_with_interpreter_bin(env: dict[str, str]) -> dict[str, str]:
    """``env`` with the interpreter's folder prepended to ``PATH`` (once)."""
    folder = str(interpreter_bin())
    parts = [p for p in env.get("PATH", "").split(os.pathsep) if p]
    if parts[:1] != [folder]:
        parts = [folder, *[p for p in parts if p != folder]]
    return {**env, "PATH": os.pathsep.join(parts)}


def console_script(name: str) -> str:
    """The path of console script ``name`` beside the interpreter, else ``name`` (found on ``PATH``)."""
    candidate = interpreter_bin() / name
    return str(candidate) if candidate.is_file() else name
