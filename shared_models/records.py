"""Typed reading of Flower records: the one place a malformed message becomes a :class:`ProtocolError`.

The round's contract (:mod:`shared_models.protocol`) and the site summary
(:mod:`shared_models.site_summary`) read their records through these functions,
so a wrong type, a missing key or bad JSON reads the same everywhere.
"""

from __future__ import annotations

import dataclasses
import json
import typing
from collections.abc import Mapping
from typing import Any

SITE_ID = "site-id"  # who a reply is from: every site record carries it


class ProtocolError(ValueError):
    """A message lacks a key or carries a malformed value."""


def checked(record: Mapping[str, Any], key: str, kind: type) -> Any:
    value = record[key]
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ProtocolError(f"message key {key!r}: expected {kind.__name__}, got {value!r}")
    return value


def read_fields(cls: type, keys: Mapping[str, str], record: Mapping[str, Any]) -> dict[str, Any]:
    """The scalar fields of ``cls`` present in ``record``; absent required ones are an error."""
    hints = typing.get_type_hints(cls)
    required = {f.name for f in dataclasses.fields(cls) if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING}
    values = {}
    for key, attr in keys.items():
        if key in record:
            values[attr] = checked(record, key, hints[attr])
        elif attr in required:
            raise ProtocolError(f"message is missing key {key!r}")
    return values


def read_json(record: Mapping[str, Any], key: str, required: bool) -> dict[str, Any]:
    if key not in record:
        if required:
            raise ProtocolError(f"message is missing key {key!r}")
        return {}
    try:
        value = json.loads(checked(record, key, str))
    except json.JSONDecodeError as exc:
        raise ProtocolError(f"message key {key!r} is not valid JSON: {exc}") from exc
    if not isinstance(value, dict):
        raise ProtocolError(f"message key {key!r}: expected a JSON object, got {value!r}")
    return value


def checked_list(record: Mapping[str, Any], key: str, kind: type) -> list[Any]:
    """A list of ``kind`` (ints accepted as floats); a missing key or another type is an error."""
    if key not in record:
        raise ProtocolError(f"message is missing key {key!r}")
    values = record[key]
    if not isinstance(values, list | tuple):
        raise ProtocolError(f"message key {key!r}: expected a list, got {values!r}")
    return [checked({key: v}, key, kind) for v in values]
