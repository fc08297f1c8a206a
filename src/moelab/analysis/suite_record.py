"""A suite directory's record, ``suite.json``: what was run, by which command, on which code and
machine, and where each run lives (``OUT/runs/NAME-seedS``, also under docs/results/SUITE/).

Read by the report, the export into docs/results and the generated results blocks; written by
:func:`moelab.analysis.suites.run_suite`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

RUNS_SUBDIR = "runs"  # a suite's runs live in OUT/runs/NAME-seedS (and docs/results/SUITE/runs/)
SUITE_FILE = "suite.json"  # what was run, by which command, on which code and machine


@dataclass(frozen=True)
class PlannedRun:
    """One training run of a suite: its group name, seed, directory and full override list."""

    group: str
    seed: int
    run_dir: Path
    preset: str
    overrides: tuple[str, ...]


def now() -> str:
    """The current UTC time as suite.json records it."""
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def suite_record(
    name: str,
    definition: dict[str, Any],
    plan: list[PlannedRun],
    out: Path,
    *,
    steps: int | None,
    extra_overrides: list[str] | None,
    allow_mixed: bool,
    command: str | None,
    process: dict[str, Any],
) -> dict[str, Any]:
    """The contents of ``suite.json``: the suite and its definition, the command that ran it, the
    steps / seeds / overrides it was given, each planned run (directory relative to ``out``) and
    the provenance of the process that ran it."""
    return {
        "suite": name,
        "description": definition["description"],
        "command": command,
        "steps": steps,
        "seeds": sorted({p.seed for p in plan}),
        "extra_overrides": list(extra_overrides or []),
        "allow_mixed": allow_mixed,
        "definition": definition,
        "runs": [
            {
                "name": p.run_dir.name,
                "group": p.group,
                "seed": p.seed,
                "run_dir": p.run_dir.relative_to(out).as_posix(),
                "preset": p.preset,
                "overrides": list(p.overrides),
            }
            for p in plan
        ],
        "provenance": process,
        "started": now(),
    }


def write_record(out: Path, record: dict[str, Any]) -> None:
    (out / SUITE_FILE).write_text(json.dumps(record, indent=1) + "\n", "utf-8")


def read_suite_record(out_dir: str | Path) -> dict[str, Any]:
    """``suite.json`` of a suite directory; ValueError naming it when missing or malformed."""
    path = Path(out_dir).expanduser() / SUITE_FILE
    try:
        record = json.loads(path.read_text("utf-8"))
    except FileNotFoundError:
        raise ValueError(
            f"{path}: missing (not a suite directory written by moelab compare)"
        ) from None
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from err
    if not isinstance(record, dict) or "runs" not in record:
        raise ValueError(f"{path}: not a suite record (no 'runs')")
    return record


def suite_run_names(record: dict[str, Any]) -> list[str]:
    """The run directory names a suite record lists (also those of older records, which stored
    the whole ``run_dir`` path)."""
    return [r.get("name") or Path(r["run_dir"]).name for r in record["runs"]]


def suite_groups(record: dict[str, Any]) -> dict[str, list[str]]:
    """``group → run names`` of a suite record, in plan order."""
    groups: dict[str, list[str]] = {}
    for r, name in zip(record["runs"], suite_run_names(record), strict=True):
        groups.setdefault(r["group"], []).append(name)
    return groups


def report_title(record: dict[str, Any]) -> str:
    """The title of a suite's report, from its record (the same when the report is redrawn)."""
    return f"moelab compare: {record['suite']} — {record['description']}"
