"""Copying a finished suite into the repository (``docs/results/<suite>/``): its Markdown report,
plots, analysis and suite record, and each run's small files - config, metrics, summary,
accounting, provenance, and the routing statistics its analysis numbers are computed from
(``routing.npz``, :mod:`moelab.analysis.routing_file`) - but no weights, no checkpoints and no
HTML report.

With the runs next to the report, every number in the report can be traced to the metrics line it
was logged on (the report's links are relative, ``runs/<run>/metrics.jsonl#L<n>``, and the layout
under the suite directory is the same as under ``moelab compare --out``). The self-contained
``report.html`` is not committed: it holds a base64 copy of every plot already committed beside
it. Its ``analysis.json`` keeps, of the top tokens per expert, those of the first routed layer,
the table the report shows (:func:`slim_analysis`: the other layers' tables were two thirds of
docs/results' analyses). :func:`redraw_suite` redraws an exported suite's report and plots from
these files alone.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from moelab.analysis.compress_report import REPORT_FILE as COMPRESS_REPORT
from moelab.analysis.report import ANALYSIS_FILE, read_analysis, write_analysis, write_report
from moelab.analysis.runs import read_run
from moelab.analysis.suite_record import (
    RUNS_SUBDIR,
    SUITE_FILE,
    read_suite_record,
    report_title,
    suite_groups,
    suite_run_names,
    write_record,
)
from moelab.rundir import RunDir

RUN_FILES = (
    RunDir.CONFIG,
    RunDir.METRICS,
    RunDir.SUMMARY,
    RunDir.ACCOUNTING,
    RunDir.PROVENANCE,
    RunDir.ROUTING,  # the analysis pass's routing statistics: its numbers, recomputable
)
REPORT_FILES = ("report.md", ANALYSIS_FILE, SUITE_FILE)
HTML = "report.html"
PLOTS = "plots"


def export_suite(src: str | Path, dest: str | Path) -> list[Path]:
    """Copy the suite written by ``moelab compare --out SRC`` into ``DEST`` and return the files
    written. ``DEST``'s own files (its README.md) are kept, except a ``report.html`` (see the
    module's docstring); its ``runs/`` and ``plots/`` are replaced, so runs or plots that are no
    longer part of the suite do not linger.

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
    (dest / HTML).unlink(missing_ok=True)
    written = [Path(shutil.copy2(src / name, dest / name)) for name in REPORT_FILES]
    slim_analysis(dest / ANALYSIS_FILE)
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


# the compress suite's record, as :data:`moelab.compress.suite.RECORD_FILE` names it (the
# analysis package may not import the compress package)
COMPRESS_RECORD = "compress_suite.json"
COMPRESS_RUN_FILES = (RunDir.CONFIG, RunDir.PROVENANCE, RunDir.SUMMARY, RunDir.ACCOUNTING)


def export_compress_suite(src: str | Path, dest: str | Path) -> list[Path]:
    """Copy the small files of a ``moelab compare --suite compress --out SRC`` directory into
    ``DEST`` and return the files written: the report and its plots (``img/``), the record, the
    rows and each compressed run's config, provenance, summary and accounting (no weights, no
    checkpoints). ``DEST``'s own files (its README.md) are kept."""
    src, dest = Path(src).expanduser(), Path(dest).expanduser()
    if not (src / COMPRESS_RECORD).is_file():
        raise ValueError(f"{src / COMPRESS_RECORD}: missing; give a compress suite's --out")
    written = []
    for name in (COMPRESS_REPORT, COMPRESS_RECORD):
        if (src / name).is_file():
            dest.mkdir(parents=True, exist_ok=True)
            written.append(Path(shutil.copy2(src / name, dest / name)))
    files = [*sorted(src.glob("img/*.png")), *sorted(src.glob("rows/*.json"))]
    for run in sorted(p for p in src.glob(f"{RUNS_SUBDIR}/*") if p.is_dir()):
        files += [run / f for f in COMPRESS_RUN_FILES if (run / f).is_file()]
    for f in files:
        target = dest / f.relative_to(src)
        target.parent.mkdir(parents=True, exist_ok=True)
        written.append(Path(shutil.copy2(f, target)))
    return written


def redraw_suite(suite_dir: str | Path, *, html: bool = False) -> dict:
    """Rewrite ``report.md``, the plots and ``analysis.json`` of an exported suite from its own
    files (suite.json, runs/*, analysis.json): no checkpoint and no evaluation pass, so a report
    committed by an earlier version of the report code can be redrawn by this one (another plot
    resolution, another layout) without training anything. The per-token numbers of runs with a
    ``routing.npz`` are recomputed from it (:func:`moelab.analysis.report.read_analysis`).
    Returns :func:`write_report`'s dict.

    A plot whose data the files do not hold (PEER/PKM usage of a run without ``routing.npz``:
    raw gate masses) is kept as drawn."""
    out = Path(suite_dir).expanduser()
    record = read_suite_record(out)
    groups = {
        g: [str(out / RUNS_SUBDIR / n) for n in names] for g, names in suite_groups(record).items()
    }
    records = [read_run(out / RUNS_SUBDIR / n) for n in suite_run_names(record)]  # plan order
    if not html:
        (out / HTML).unlink(missing_ok=True)  # it would contradict the redrawn report.md
    res = write_report(
        records,
        read_analysis(out, records),
        out,
        groups=groups,
        title=report_title(record),
        mixed_code="allow" if record.get("allow_mixed") else "refuse",
        html=html,
        redraw=True,
    )
    slim_analysis(out / ANALYSIS_FILE)
    if record.get("warnings") != res["warnings"]:  # the results blocks show the suite's
        write_record(out, {**record, "warnings": res["warnings"]})
    return res


def slim_analysis(path: Path) -> None:
    """Rewrite ``analysis.json`` keeping each run's top tokens per expert for its first routed
    layer only: the table the report shows, so a redrawn report is the same, while the tables of
    every layer of every seed would outweigh all of docs/results' other numbers together."""
    dump: dict[str, Any] = json.loads(path.read_text("utf-8"))
    for run in dump.values():
        tops = run.get("results", {}).get("top_tokens")
        if tops:
            run["results"]["top_tokens"] = dict(list(tops.items())[:1])
    write_analysis(path, dump)
