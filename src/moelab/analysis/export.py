"""Copying a finished suite into the repository (``docs/results/<suite>/``): its report, plots,
analysis and suite record, and each run's small files - config, metrics, summary, accounting,
provenance - but no weights and no checkpoints.

With the runs next to the report, every number in the report can be traced to the metrics line it
was logged on (the report's links are relative, ``runs/<run>/metrics.jsonl#L<n>``, and the layout
under the suite directory is the same as under ``moelab compare --out``).
"""

from __future__ import annotations

import shutil
from pathlib import Path

from moelab.analysis.suites import RUNS_SUBDIR, read_suite_record, suite_run_names
from moelab.rundir import RunDir

RUN_FILES = (RunDir.CONFIG, RunDir.METRICS, RunDir.SUMMARY, RunDir.ACCOUNTING, RunDir.PROVENANCE)
REPORT_FILES = ("report.md", "analysis.json", "suite.json")
HTML = "report.html"
PLOTS = "plots"


def export_suite(src: str | Path, dest: str | Path, *, html: bool = True) -> list[Path]:
    """Copy the suite written by ``moelab compare --out SRC`` into ``DEST`` and return the files
    written. ``DEST``'s own files (its README.md) are kept; its ``runs/`` and ``plots/`` are
    replaced, so runs or plots that are no longer part of the suite do not linger.

    Every run the suite record lists must have completed (ValueError naming the first that has
    not), so a half-trained suite is never committed as a result."""
    src, dest = Path(src).expanduser(), Path(dest).expanduser()
    names = suite_run_names(read_suite_record(src))
    for name in names:
        run = RunDir(src / RUNS_SUBDIR / name)
        if not run.has_summary:
            raise ValueError(
                f"{run.path}: run not finished (no {RunDir.SUMMARY}); finish the "
                "suite before exporting it"
            )
    for name in REPORT_FILES:
        if not (src / name).is_file():
            raise ValueError(f"{src / name}: missing; export a suite after its report is written")
    dest.mkdir(parents=True, exist_ok=True)
    for sub in (RUNS_SUBDIR, PLOTS):
        if (dest / sub).exists():
            shutil.rmtree(dest / sub)
    written = []
    for name in (*REPORT_FILES, *((HTML,) if html else ())):
        written.append(Path(shutil.copy2(src / name, dest / name)))
    if not html and (dest / HTML).exists():
        (dest / HTML).unlink()  # a stale self-contained report would contradict report.md
    if (src / PLOTS).is_dir():
        (dest / PLOTS).mkdir()
        for png in sorted((src / PLOTS).glob("*.png")):
            written.append(Path(shutil.copy2(png, dest / PLOTS / png.name)))
    for name in names:
        run_src, run_dest = src / RUNS_SUBDIR / name, dest / RUNS_SUBDIR / name
        run_dest.mkdir(parents=True)
        for f in RUN_FILES:
            if (run_src / f).is_file():
                written.append(Path(shutil.copy2(run_src / f, run_dest / f)))
    return written
