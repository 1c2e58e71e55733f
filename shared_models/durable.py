"""Durable files: atomic writes, tensor checksums and a pickle-free reader (site state, server checkpoints).

A crash must leave either the old or the new file, never a torn one: write a
temporary file in the same folder, fsync it, rename it over the target, fsync
the folder.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, BinaryIO

import torch


def tensors_checksum(tensors: Mapping[str, torch.Tensor]) -> str:
    """SHA-256 over names, dtypes, shapes and bytes, in key order."""
    digest = hashlib.sha256()
    for key in sorted(tensors):
        t = tensors[key].detach().cpu().contiguous()
        digest.update(f"{key}|{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


def atomic_write(path: Path, write: Callable[[BinaryIO], None]) -> None:
    """Call ``write(fh)`` on a temp file next to ``path``, fsync, rename, fsync the dir."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def read_torch(path: str | Path) -> Any:
    """The one way fedsite reads a torch file: tensors and plain containers only.

    ``weights_only=True`` refuses any pickled global outside torch's allow-list,
    so a crafted checkpoint or state file raises instead of running code.
    """
    return torch.load(path, map_location="cpu", weights_only=True)


def atomic_torch_save(obj: object, path: Path) -> None:
    """``torch.save`` with the atomic protocol (site state, checkpoints)."""
    atomic_write(path, lambda fh: torch.save(obj, fh))


def atomic_write_text(path: Path, text: str) -> None:
    """Write a UTF-8 text file with the atomic protocol (results, reports)."""
    atomic_write(path, lambda fh: fh.write(text.encode()))
