"""The JSON files of a run (``metrics.jsonl``, ``summary.json``) as strict JSON.

A diverging run produces NaN and infinite losses and norms. Python's :mod:`json` would write them
as bare ``NaN`` / ``Infinity``, which no other JSON reader accepts (``jq``, JavaScript, most
dataframe loaders stop at the line). Here a non-finite float is written as the *string*
``"NaN"``, ``"Infinity"`` or ``"-Infinity"``, so every line stays valid JSON and still says what
the value was; :func:`decode` turns those strings back into floats, so moelab's own readers see
the numbers they logged (and files written before this rule, with bare ``NaN``, still read).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import IO, Any

__all__ = ["MetricsWriter", "decode", "dumps", "encode", "has_nonfinite"]

NON_FINITE = {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}


def _name(value: float) -> str:
    if math.isnan(value):
        return "NaN"
    return "Infinity" if value > 0 else "-Infinity"


def encode(value: Any) -> Any:
    """``value`` with every non-finite float (also inside dicts, lists and tuples) replaced by its
    string name."""
    if isinstance(value, float) and not math.isfinite(value):
        return _name(value)
    if isinstance(value, dict):
        return {k: encode(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [encode(v) for v in value]
    return value


def decode(value: Any) -> Any:
    """The inverse of :func:`encode`: the strings ``"NaN"``, ``"Infinity"``, ``"-Infinity"``
    become floats again (anywhere in the structure)."""
    if isinstance(value, str):
        return NON_FINITE.get(value, value)
    if isinstance(value, dict):
        return {k: decode(v) for k, v in value.items()}
    if isinstance(value, list):
        return [decode(v) for v in value]
    return value


def has_nonfinite(text: str) -> bool:
    """Whether JSON ``text`` may hold an encoded non-finite number (a cheap test, so readers
    decode only the lines that need it)."""
    return '"NaN"' in text or 'Infinity"' in text


def dumps(value: Any, indent: int | None = None) -> str:
    """Strict JSON of ``value`` (non-finite floats as strings, see the module docstring)."""
    return json.dumps(encode(value), indent=indent, allow_nan=False)


class MetricsWriter:
    """Appends records to ``metrics.jsonl``, one strict JSON object per line, flushed at once (a
    killed run loses at most the line being written)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._file: IO[str] = open(path, "a", encoding="utf-8")  # noqa: SIM115 - see close()

    def write(self, record: dict[str, Any]) -> None:
        self._file.write(dumps(record) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()
