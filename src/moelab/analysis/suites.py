"""Named experiment suites for ``moelab compare``: data (run name → preset + overrides), plus the
small driver that trains each (run, seed) with the training library and writes one report.

A suite is a plain dict so that adding one is a few lines of data, not code:

    {"description": str, "seeds": [0, 1, 2], "overrides": [...],   # applied to every run
     "runs": {"name": {"preset": "topk-tiny", "overrides": ["model.ffn.num_experts=16"]}}}

Seeds set both ``train.seed`` (initialisation) and ``data.seed`` (training-window stream).
"""

from __future__ import annotations

import copy
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from moelab import provenance
from moelab.analysis.origin import check_same_code
from moelab.analysis.report import build_report
from moelab.analysis.suite_catalog import ROUTER_RUNS, SUITES
from moelab.analysis.suite_record import (
    RUNS_SUBDIR,
    PlannedRun,
    now,
    report_title,
    suite_record,
    write_record,
)
from moelab.config import dump_yaml, flatten
from moelab.rundir import RunDir
from moelab.train import resolve_run_config, train

__all__ = ["ROUTER_RUNS", "SUITES", "get_suite", "plan_suite", "run_suite"]


def get_suite(name: str) -> dict[str, Any]:
    """A copy of suite ``name``; ValueError listing the suites when unknown."""
    if name not in SUITES:
        raise ValueError(f"suite: unknown suite {name!r}; allowed: {', '.join(sorted(SUITES))}")
    return copy.deepcopy(SUITES[name])


def plan_suite(
    name: str,
    out_dir: str | Path,
    seeds: list[int] | None = None,
    steps: int | None = None,
    extra_overrides: list[str] | None = None,
) -> list[PlannedRun]:
    """The (run, seed) list of a suite, in training order (seed-major, so a partial suite still
    compares every method). ``steps`` overrides ``train.steps`` of every run (quick checks)."""
    suite = get_suite(name)
    seeds = list(suite["seeds"] if seeds is None else seeds)
    if not seeds:
        raise ValueError("seeds: give at least one seed")
    if any(not isinstance(s, int) or s < 0 for s in seeds):
        raise ValueError(f"seeds: must be non-negative integers, got {seeds}")
    common = list(suite.get("overrides", []))
    if steps is not None:
        if steps < 1:
            raise ValueError(f"steps: must be >= 1, got {steps}")
        common.append(f"train.steps={steps}")
    common += list(extra_overrides or [])
    runs_dir = Path(out_dir).expanduser() / RUNS_SUBDIR
    plan = []
    for seed in seeds:
        for group, spec in suite["runs"].items():
            ov = (*spec.get("overrides", []), *common, f"train.seed={seed}", f"data.seed={seed}")
            plan.append(
                PlannedRun(group, seed, runs_dir / f"{group}-seed{seed}", spec["preset"], tuple(ov))
            )
    return plan


def check_kept_runs(plan: list[PlannedRun]) -> None:
    """Refuse (ValueError naming the run and the keys) a run kept from an earlier invocation whose
    config is not the one this plan would train: a suite resumed with other ``--steps`` or
    ``--set`` values would otherwise report runs of two different settings as one."""
    for p in plan:
        rundir = RunDir(p.run_dir)
        if not rundir.holds_run:
            continue
        want = flatten(
            yaml.safe_load(
                dump_yaml(resolve_run_config(preset=p.preset, overrides=list(p.overrides)))
            )
        )
        have = flatten(rundir.raw_config())
        diff = sorted(k for k in set(want) | set(have) if want.get(k) != have.get(k))
        if diff:
            shown = ", ".join(f"{k}: {have.get(k)!r} there, {want.get(k)!r} now" for k in diff[:4])
            raise ValueError(
                f"{p.run_dir}: kept from an earlier run with other settings ({shown}"
                f"{', ...' if len(diff) > 4 else ''}); delete it, or give the same --steps / "
                "--seeds / --set as before"
            )


def _default_trainer() -> Callable[[PlannedRun], Any]:
    """Train one planned run with ``moelab.train``: a run stopped after a checkpoint resumes, one
    stopped before its first checkpoint starts again."""

    def run(p: PlannedRun) -> Any:
        cfg = resolve_run_config(preset=p.preset, overrides=list(p.overrides))
        rundir = RunDir(p.run_dir)
        started = rundir.holds_run
        resume = started and rundir.has_latest
        return train(
            cfg, p.run_dir, resume=resume, overwrite=started and not resume, preset=p.preset
        )

    return run


def train_in_subprocess(p: PlannedRun, log_dir: Path) -> None:
    """Train one planned run in a fresh ``python -m moelab train`` process (how ``jobs > 1`` runs
    several at once), output in ``log_dir/<run>.log``; same resume rules as the in-process
    trainer. RuntimeError naming the log when the run fails."""
    rundir = RunDir(p.run_dir)
    started = rundir.holds_run
    cmd = [sys.executable, "-m", "moelab", "train"]
    if started and rundir.has_latest:
        cmd += ["--resume", str(p.run_dir)]
    else:
        cmd += ["--preset", p.preset, "--run-dir", str(p.run_dir), *p.overrides]
        cmd += ["--overwrite"] if started else []
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / f"{p.run_dir.name}.log"
    with open(log_path, "w") as log:
        done = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, check=False)
    if done.returncode != 0:
        raise RuntimeError(
            f"{p.run_dir.name}: training failed (exit {done.returncode}), see {log_path}"
        )


def _train_all(
    plan: list[PlannedRun],
    trainer: Callable[[PlannedRun], Any] | None,
    jobs: int,
    log_dir: Path,
    log: Callable[[str], None],
) -> None:
    """Train the runs of ``plan`` that have no summary yet, ``jobs`` at a time (``jobs > 1``:
    each in its own process; each run trains with its config's ``train.threads``, so on a
    machine with N idle cores N jobs take about 1/N of the time and give the same numbers)."""
    todo = []
    for i, p in enumerate(plan, 1):
        if RunDir(p.run_dir).has_summary:
            log(f"[{i}/{len(plan)}] {p.run_dir.name}: done already, kept")
        else:
            todo.append((i, p))

    def one(item: tuple[int, PlannedRun]) -> None:
        i, p = item
        log(f"[{i}/{len(plan)}] {p.run_dir.name}: training ({p.preset} {' '.join(p.overrides)})")
        t = time.time()
        if trainer is not None:
            trainer(p)
        else:
            train_in_subprocess(p, log_dir)
        log(f"[{i}/{len(plan)}] {p.run_dir.name}: {time.time() - t:.0f} s")

    if jobs <= 1 or trainer is not None:
        for item in todo:
            one(item)
        return
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=jobs) as pool:
        for future in [pool.submit(one, item) for item in todo]:
            future.result()  # the first failure is raised once every started run has ended


def _trained_span(plan: list[PlannedRun]) -> float | None:
    """Seconds from the first run's start (its config is written before its first step) to the
    last run's end (its summary is written last): a suite reported by a later process than the
    one that trained it still says how long training took."""
    try:
        starts = [(p.run_dir / RunDir.CONFIG).stat().st_mtime for p in plan]
        ends = [(p.run_dir / RunDir.SUMMARY).stat().st_mtime for p in plan]
    except OSError:
        return None
    return max(ends) - min(starts) if plan else None


def run_suite(
    name: str,
    out_dir: str | Path,
    *,
    seeds: list[int] | None = None,
    steps: int | None = None,
    extra_overrides: list[str] | None = None,
    analyze: bool = True,
    trainer: Callable[[PlannedRun], Any] | None = None,
    report_settings: Any = None,
    allow_mixed: bool = False,
    command: str | None = None,
    jobs: int = 1,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Train every run of suite ``name`` under ``out_dir/runs/`` (runs that completed, i.e. have
    a summary, are kept, so an interrupted suite resumes), then write the report to ``out_dir``
    (``report.md``, ``report.html``) with seeds averaged per run name.

    The runs of one suite must come from one version of the code and one plan: when runs remain to
    train, kept runs trained by another commit (or from a tree with uncommitted changes while this
    one is clean, or the reverse) are refused before anything trains, and so is a finished suite
    whose runs disagree, unless ``allow_mixed`` (the report then says so at the top); kept runs
    whose config differs from the plan's (another ``steps`` or override) are always refused.
    ``out_dir/suite.json`` records the suite, the command, steps, seeds, overrides, timings and this
    process's provenance. ``jobs > 1`` trains that many runs at once, each in its own process (logs
    in ``out_dir/logs/``).
    """
    if not isinstance(jobs, int) or jobs < 1:
        raise ValueError(f"jobs: must be an integer >= 1, got {jobs!r}")
    plan = plan_suite(name, out_dir, seeds, steps, extra_overrides)
    out = Path(out_dir).expanduser()
    here = provenance.collect()
    if trainer is None:  # a custom trainer (tests) may write configs of its own
        check_kept_runs(plan)
    if trainer is None and jobs <= 1:
        trainer = _default_trainer()
    trains = any(not RunDir(p.run_dir).has_summary for p in plan)
    if not allow_mixed:
        kept = {
            p.run_dir.name: RunDir(p.run_dir).provenance()
            for p in plan
            if RunDir(p.run_dir).holds_run
        }
        # runs still to train must come from the code that trained the kept ones; a suite whose
        # runs have all finished is only reported (a later report version may redraw it)
        if kept:
            mine = {"this process": [here]} if trains else {}
            check_same_code({**mine, **kept}, False, str(out / RUNS_SUBDIR))
    out.mkdir(parents=True, exist_ok=True)
    record = suite_record(
        name,
        get_suite(name),
        plan,
        out,
        steps=steps,
        extra_overrides=extra_overrides,
        allow_mixed=allow_mixed,
        command=command,
        process=here,
    )
    write_record(out, record)
    t0 = time.time()
    _train_all(plan, trainer, jobs, out / "logs", log)
    trained_here = time.time() - t0
    # only reported here: the training time the run files span
    train_seconds = trained_here if trains else (_trained_span(plan) or trained_here)
    groups: dict[str, list[str]] = {}
    for p in plan:
        groups.setdefault(p.group, []).append(str(p.run_dir))
    res = build_report(
        [p.run_dir for p in plan],
        out,
        groups=groups,
        analyze=analyze,
        settings=report_settings,
        title=report_title(record),
        mixed_code="allow" if allow_mixed else "refuse",
        save_routing=True,  # the suite's own runs: export commits the file (docs/results)
    )
    record.update(
        train_seconds=round(train_seconds, 1),
        report_seconds=round(time.time() - t0 - trained_here, 1),
        finished=now(),
        warnings=res["warnings"],
    )
    write_record(out, record)
    res["train_seconds"] = train_seconds
    return res
