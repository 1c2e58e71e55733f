"""``--log-format json``: every line a daemon writes becomes one JSON object, for log shippers.

A hospital's log pipeline (journald -> Loki, Elastic, Splunk) indexes fields, not
free text. The daemons' own lines, the Flower lines they echo from their children
and Python tracebacks all go through stdout/stderr, so the switch wraps those two
streams: each complete line is written as ``{"time", "level", "component", ...,
"message"}``. The level is Flower's (``INFO :  ...``) when the line carries one,
else ``info`` on stdout and ``error`` on stderr.
"""

from __future__ import annotations

import datetime as dt
import io
import json
import re
import sys
from typing import Any, TextIO

LOG_FORMATS = ("text", "json")
_ANSI = re.compile(r"\x1b\[[0-9;]*m")  # Flower colours its level names
_LEVEL = re.compile(r"^\s*(DEBUG|INFO|WARNING|WARN|ERROR|CRITICAL)\b\s*:?\s*")


class JsonLineStream(io.TextIOBase):
    """A text stream that writes each complete line to ``target`` as one JSON object."""

    def __init__(self, target: TextIO, default_level: str, fields: dict[str, Any]):
        super().__init__()
        self.target, self.default_level, self.fields = target, default_level, dict(fields)
        self._pending = ""

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        self._pending += text
        *lines, self._pending = self._pending.split("\n")
        for line in lines:
            self._emit(line)
        return len(text)

    def flush(self) -> None:
        self.target.flush()

    def close_pending(self) -> None:
        """Write a last line that has no newline (at exit)."""
        if self._pending:
            self._emit(self._pending)
            self._pending = ""
        self.flush()

    def _emit(self, line: str) -> None:
        line = _ANSI.sub("", line).rstrip("\r")
        if not line.strip():
            return
        level = self.default_level
        if m := _LEVEL.match(line):
            level = {"WARN": "warning"}.get(m.group(1), m.group(1).lower())
            line = line[m.end():]
        record = {"time": dt.datetime.now(dt.timezone.utc).isoformat(timespec="milliseconds"), "level": level,
                  **self.fields, "message": line}
        self.target.write(json.dumps(record) + "\n")


def use_log_format(fmt: str, component: str, **fields: Any) -> None:
    """Switch this process's stdout and stderr to ``fmt`` (``text`` leaves them as they are)."""
    if fmt not in LOG_FORMATS:
        raise ValueError(f"--log-format: expected one of {', '.join(LOG_FORMATS)}, got {fmt!r}")
    if fmt == "json" and not isinstance(sys.stdout, JsonLineStream):
        sys.stdout = JsonLineStream(sys.__stdout__, "info", {"component": component, **fields})
        sys.stderr = JsonLineStream(sys.__stderr__, "error", {"component": component, **fields})


def add_log_fields(**fields: Any) -> None:
    """Fields every later JSON line carries (e.g. the site id, once the config is read); no-op for text."""
    for stream in (sys.stdout, sys.stderr):
        if isinstance(stream, JsonLineStream):
            stream.fields.update(fields)
