"""Daemons find Flower's console scripts beside their interpreter, not only on PATH."""

import os
import sys
from pathlib import Path

from shared_models.executables import console_script, env_with_interpreter_bin


def test_interpreter_folder_is_first_on_path_once():
    folder = str(Path(sys.executable).parent)
    env = env_with_interpreter_bin({"PATH": os.pathsep.join(["/usr/bin", folder, "/bin"])})
    parts = env["PATH"].split(os.pathsep)
    assert parts[0] == folder and parts.count(folder) == 1 and parts[1:] == ["/usr/bin", "/bin"]


def test_empty_path_still_reaches_the_interpreter_folder():
    assert env_with_interpreter_bin({})["PATH"] == str(Path(sys.executable).parent)


def test_console_script_resolves_to_the_installed_file_when_present():
    path = console_script("flower-superlink")
    beside = Path(sys.executable).parent / "flower-superlink"
    assert path == (str(beside) if beside.is_file() else "flower-superlink")
    assert console_script("no-such-script-xyz") == "no-such-script-xyz"
