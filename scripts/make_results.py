#!/usr/bin/env python3
"""``make results``: rerun every suite of docs/results with the current code, copy each suite's
Markdown report, plots and per-run data into docs/results/<suite>/, and rewrite the generated
results blocks (docs/results/README.md and each suite's README.md).

Why one command: a result is only as trustworthy as the reader's ability to regenerate it. This
script is the whole path from code to the numbers in docs/results:

1. refuse a tree with uncommitted changes (the runs would record ``git_dirty``, and no commit
   would hold the code behind the numbers) unless ``--allow-dirty``;
2. for each suite, drop runs in its working directory (``runs/results/<suite>``, ignored by git)
   that were trained by other code, then ``moelab compare --suite <suite>``: runs already trained
   by this code are kept, so an interrupted ``make results`` resumes;
3. once every suite has trained, export each one (``moelab.analysis.export``: report.md, plots,
   analysis.json, suite.json, each run's config / metrics / summary / accounting / provenance;
   no weights, and no report.html, which would hold a second copy of every plot) into
   docs/results/<suite>/ - after training, so that later suites do not train on a tree that the
   export already made dirty;
4. rewrite the results blocks (scripts/results_readme.py) from the exported files.

``--redraw`` trains and exports nothing: it redraws the committed reports and plots of
docs/results from the files there (``moelab.analysis.export.redraw_suite``), for a change to the
report or plotting code, and rewrites the blocks.

Reduced suites (``--steps``, ``--seeds``, ``--set``) are for checking the machinery and may not be
written into docs/results: give ``--results DIR`` elsewhere.

Usage::

    python scripts/make_results.py                         # all suites (~2 h on 2 cores)
    python scripts/make_results.py --suites routers --compare-args "--jobs 2"   # 35 min
    python scripts/make_results.py --suites load-balance   # one suite
    python scripts/make_results.py --export-only           # re-export and re-render, no training
    python scripts/make_results.py --redraw                # redraw docs/results from its files
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def current_code() -> str:
    """This checkout's code version, spelled as the runs' provenance spells it."""
    from moelab.analysis.origin import code_version
    from moelab.provenance import git_state

    commit, dirty = git_state()
    return code_version({"git_commit": commit, "git_dirty": dirty})


def drop_stale_runs(suite_dir: Path, code: str, log=print) -> list[Path]:
    """Remove run directories under ``suite_dir/runs`` that any other code version trained (or
    that have no provenance record): ``make results`` must not report them as current."""
    from moelab.analysis.origin import code_version
    from moelab.analysis.suites import RUNS_SUBDIR
    from moelab.rundir import RunDir

    dropped = []
    runs = suite_dir / RUNS_SUBDIR
    for run_dir in sorted(runs.iterdir()) if runs.is_dir() else []:
        records = RunDir(run_dir).provenance()
        versions = {code_version(r) for r in records} or {"unknown"}
        if versions != {code}:
            log(f"{run_dir}: trained by {', '.join(sorted(versions))}, not {code}: removed")
            shutil.rmtree(run_dir)
            dropped.append(run_dir)
    return dropped


def run_suites(commands: dict[str, list[str]], jobs: int) -> int:
    """Run each suite's ``moelab compare`` with at most ``jobs`` at a time (every run trains on
    one thread, so on a machine with N idle cores N jobs take about 1/N of the time; the runs'
    numbers do not depend on it). Returns 0, or 1 if any suite failed."""
    pending, running, failed = list(commands.items()), {}, False
    while pending or running:
        while pending and len(running) < jobs:
            suite, cmd = pending.pop(0)
            print(f"== {suite}: {' '.join(cmd[1:])}", flush=True)
            (ROOT / "runs").mkdir(exist_ok=True)
            log = open(ROOT / "runs" / f"results-{suite}.log", "w")  # noqa: SIM115
            running[suite] = (
                subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=log),
                log,
                time.time(),
            )
        time.sleep(2)
        for suite, (proc, log, t) in list(running.items()):
            if proc.poll() is not None:
                log.close()
                del running[suite]
                failed |= proc.returncode != 0
                state = "done" if proc.returncode == 0 else f"FAILED (runs/results-{suite}.log)"
                print(f"== {suite}: {state} in {(time.time() - t) / 60:.1f} min", flush=True)
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    from moelab.analysis.suites import SUITES

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--suites", nargs="+", choices=list(SUITES), default=list(SUITES))
    p.add_argument(
        "--work",
        type=Path,
        default=ROOT / "runs" / "results",
        help="where the suites train (default runs/results, ignored by git)",
    )
    p.add_argument("--results", type=Path, default=ROOT / "docs" / "results")
    p.add_argument("--steps", type=int, default=None, help="reduced check: train.steps")
    p.add_argument("--seeds", type=int, nargs="+", default=None, help="reduced check: seeds")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="reduced check: override for every run",
    )
    p.add_argument(
        "--compare-args",
        default="",
        help="more arguments for moelab compare, e.g. '--max-batches 2'",
    )
    p.add_argument(
        "--allow-dirty",
        action="store_true",
        help="train from a tree with uncommitted changes (the results say so; runs "
        "an earlier dirty tree of the same commit trained count as current)",
    )
    p.add_argument(
        "--jobs",
        type=int,
        default=1,
        help="suites trained at the same time (each run uses one thread)",
    )
    p.add_argument(
        "--export-only",
        action="store_true",
        help="no training: export the working directories and rewrite the blocks",
    )
    p.add_argument(
        "--redraw",
        action="store_true",
        help="no training, no export: redraw the reports and plots under --results from "
        "their own files, then rewrite the blocks",
    )
    args = p.parse_args(argv)
    reduced = args.steps is not None or args.seeds is not None or args.overrides
    default_results = (ROOT / "docs" / "results").resolve()
    if reduced and args.results.resolve() == default_results:
        p.error(
            "a reduced suite (--steps/--seeds/--set) may not overwrite docs/results: "
            "give --results DIR"
        )
    t0 = time.time()
    if not (args.export_only or args.redraw):
        code = current_code()
        if code.endswith("+dirty") and not args.allow_dirty:
            p.error(
                f"the tree has uncommitted changes ({code}): commit them first, so the "
                "results name the commit that produced them (or pass --allow-dirty)"
            )
        commands = {}
        for suite in args.suites:
            out = args.work / suite
            drop_stale_runs(out, code)
            # relative to the checkout when inside it: suite.json records the command, and the
            # committed record should not carry this machine's paths
            where = os.path.relpath(out, ROOT) if out.resolve().is_relative_to(ROOT) else out
            cmd = [sys.executable, "-m", "moelab", "compare", "--suite", suite, "--out", str(where)]
            if args.steps is not None:
                cmd += ["--steps", str(args.steps)]
            if args.seeds is not None:
                cmd += ["--seeds", *map(str, args.seeds)]
            for o in args.overrides:
                cmd += ["--set", o]
            commands[suite] = cmd + args.compare_args.split()
        if run_suites(commands, args.jobs) != 0:
            print(
                "make_results: a suite failed; fix it and rerun (finished runs are kept)",
                file=sys.stderr,
            )
            return 1
    from moelab.analysis.export import export_suite, redraw_suite
    from moelab.analysis.results import write_blocks

    for suite in args.suites:
        if args.redraw:
            res = redraw_suite(args.results / suite)
            print(f"redrew {suite}: {len(res['images'])} plots in {args.results / suite}")
        else:
            files = export_suite(args.work / suite, args.results / suite)
            print(f"exported {suite}: {len(files)} files into {args.results / suite}")
    for path in write_blocks(args.results):
        print(f"rewrote the results block of {path}")
    print(f"make_results: done in {(time.time() - t0) / 60:.1f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main())
