"""What makes two runs of one cell the same run: its configuration, the code and the data.

A finished cell is reused only when all three match. Anything else starts the
cell from an empty folder (no site state or checkpoint of an older run is ever
loaded), except a run of the *same* identity that was interrupted: that one
resumes after its last checkpoint.
"""

from __future__ import annotations

import functools
import hashlib
import json
import shutil
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from shared_models.durable import atomic_write_text
from shared_models.protocol import FEDERATION_FILE

PACKAGES = ("shared_models", "client", "server", "simulations")
IDENTITY_FILE = "identity.json"
# What a cell writes while it runs; cleared when a different identity takes the folder over.
CELL_OUTPUTS = (FEDERATION_FILE, "checkpoints", "site-state")
# Run-config keys that say how to run a cell, not what it computes.
NOT_IDENTITY = ("resume", "out-dir", "state-dir", "wait-seconds", "round-timeout")


def _digest(chunks: Iterable[bytes]) -> str:
    h = hashlib.sha256()
    for chunk in chunks:
        h.update(len(chunk).to_bytes(8, "little"))
        h.update(chunk)
    return h.hexdigest()


@functools.lru_cache(maxsize=1)
def code_version() -> str:
    """Hash of the installed sources of fedsite's packages (file names and contents)."""
    root = Path(__file__).resolve().parents[1]
    files = sorted(p for pkg in PACKAGES for p in (root / pkg).rglob("*.py") if "__pycache__" not in p.parts)
    return _digest(c for p in files for c in (str(p.relative_to(root)).encode(), p.read_bytes()))[:16]


@functools.lru_cache(maxsize=8)
def data_fingerprint(root: Path, sites: tuple[str, ...]) -> str:
    """Hash of every file of the sites' folders (relative name and contents)."""
    files = sorted(p for s in sites for p in (root / s).rglob("*") if p.is_file())
    return _digest(c for p in files for c in (str(p.relative_to(root)).encode(), p.read_bytes()))[:16]


def cell_identity(run_config: dict[str, Any], code: str, data: str) -> str:
    """The identity of one cell's run: what it computes, with which code, on which data."""
    what = {k: v for k, v in sorted(run_config.items()) if k not in NOT_IDENTITY}
    return _digest([json.dumps(what, sort_keys=True).encode(), code.encode(), data.encode()])[:16]


def stored_identity(cell_dir: Path) -> str | None:
    path = cell_dir / IDENTITY_FILE
    try:
        return json.loads(path.read_text())["identity"]
    except (OSError, ValueError, KeyError):
        return None


def claim_cell_dir(cell_dir: Path, identity: str, code: str, data: str) -> bool:
    """Make ``cell_dir`` belong to ``identity``; True if it already did (an interrupted run to resume)."""
    if stored_identity(cell_dir) == identity:
        return True
    for name in CELL_OUTPUTS:
        path = cell_dir / name
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)
    cell_dir.mkdir(parents=True, exist_ok=True)

    atomic_write_text(cell_dir / IDENTITY_FILE, json.dumps({"identity": identity, "code": code, "data": data}, indent=2))
    return False
