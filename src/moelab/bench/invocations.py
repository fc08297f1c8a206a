"""Repeat a benchmark in fresh processes and report per-row medians with their spread.

One process's timings depend on its heap layout, thread placement and whatever else the machine
was doing at that moment, so one invocation can be several percent off the next. A claim a user can
reproduce is the median over several invocations with the range beside it; this module runs the
invocations (each a fresh ``python -m <module> <json>`` child) and folds their rows together.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
from collections.abc import Sequence
from typing import Any


def run_child(module: str, payload: dict[str, Any], threads: int | None = None) -> Any:
    """Run ``python -m module '<payload json>'`` and return the JSON on its last stdout line."""
    env = dict(os.environ)
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
    proc = subprocess.run(
        [sys.executable, "-m", module, json.dumps(payload)],
        capture_output=True,
        text=True,
        env=env,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"benchmark child {module} {payload} failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def aggregate_rows(
    runs: Sequence[Sequence[dict[str, Any]]], key: Sequence[str], fields: Sequence[str]
) -> list[dict[str, Any]]:
    """Fold the rows of several invocations into one row per ``key``, in first-seen order.

    Each numeric ``field`` becomes the median over the invocations that produced the row, with
    ``<field>_min`` / ``<field>_max`` beside it; other columns are taken from the first run.
    ``invocations`` counts the runs that had the row (a row missing from a run is not invented).
    """
    grouped: dict[tuple, list[dict[str, Any]]] = {}
    for rows in runs:
        for row in rows:
            grouped.setdefault(tuple(row[k] for k in key), []).append(row)
    out = []
    for same in grouped.values():
        merged = dict(same[0], invocations=len(same))
        for field in fields:
            values = [r[field] for r in same if r.get(field) is not None]
            if not values:
                continue
            merged[field] = statistics.median(values)
            merged[f"{field}_min"], merged[f"{field}_max"] = min(values), max(values)
        out.append(merged)
    return out


def spread(row: dict[str, Any], field: str, fmt: str = ".3f") -> str:
    """``"min–max"`` of an aggregated field, or ``""`` for a single invocation."""
    lo, hi = row.get(f"{field}_min"), row.get(f"{field}_max")
    if lo is None or hi is None or row.get("invocations", 1) < 2:
        return ""
    return f"{lo:{fmt}}–{hi:{fmt}}"
