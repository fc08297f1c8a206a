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

# The routers suite: (run name, preset, overrides). Every routed run has the active expert
# parameters of topk-tiny's one width-344 expert per token: top-2 methods use 16 experts of width
# 172 (granularity 2, with `topk-g2` as their TopK control); Chain-of-Experts two passes of one
# width-172 expert. Methods whose experts per token vary (ReMoE, top-p, null experts, MoE++) have
# that as their target or their cap (null experts: top-2 of 8 real + 8 null experts, one real
# expert per token on average when balanced) and report what they used (the suite table's
# "FFN experts / token").
ROUTER_RUNS: tuple[tuple[str, str, list[str]], ...] = (
    ("dense", "dense-tiny", []),
    ("topk", "topk-tiny", []),
    ("remoe", "remoe-tiny", []),
    ("expert_choice", "topk-tiny", ["model.ffn.router=expert_choice"]),
    ("hash", "topk-tiny", ["model.ffn.router=hash"]),
    ("topk-g2", "topk-tiny", ["model.ffn.granularity=2"]),
    ("sparsemixer", "topk-tiny", ["model.ffn.router=sparsemixer", "model.ffn.granularity=2"]),
    ("lory", "topk-tiny", ["model.ffn.router=lory", "model.ffn.router_options.segment_len=32"]),
    (
        "top_p",
        "topk-tiny",
        ["model.ffn.router=top_p", "model.ffn.granularity=2", "model.ffn.router_options.p=0.4"],
    ),
    (
        "null",
        "topk-tiny",
        ["model.ffn.router=null", "model.ffn.top_k=2", "model.ffn.router_options.null_experts=8"],
    ),
    ("moepp", "topk-tiny", ["model.ffn.router=moepp", "model.ffn.granularity=2"]),
    ("aux_free", "topk-tiny", ["model.ffn.router=aux_free", "model.ffn.granularity=2"]),
    ("rmoe", "topk-tiny", ["model.ffn.router=rmoe"]),
    (
        "chain",
        "topk-tiny",
        ["model.ffn.num_experts=16", "model.ffn.d_hidden=172", "model.ffn.iterations=2"],
    ),
    ("momentum", "topk-tiny", ["model.ffn.momentum=0.7"]),
)

SUITES: dict[str, dict[str, Any]] = {
    "paper-mini": {
        "description": "ReMoE Table 2 in miniature: dense vs TopK MoE vs ReMoE vs PEER, matched "
        "on active FLOPs (E=8, k=1), on the embedded corpus, 250 steps, 3 seeds",
        "seeds": [0, 1, 2],
        # 250 of the presets' 300 steps keep the 12 runs (~13-16 min per seed: PEER ~6 min,
        # ReMoE ~3.5, TopK ~2.5, dense ~2) plus the report under 60 min on a shared 2-core CPU;
        # ReMoE settles after ~100 steps, so its three stages are all visible.
        "overrides": ["train.steps=250"],
        "runs": {
            "dense": {"preset": "dense-tiny", "overrides": []},
            "topk": {"preset": "topk-tiny", "overrides": []},
            "remoe": {"preset": "remoe-tiny", "overrides": []},
            "peer": {"preset": "peer-tiny", "overrides": []},
        },
    },
    "experts-scaling": {
        "description": "ReMoE Fig. 5 in miniature: TopK vs ReMoE (k=1) as the number of experts "
        "grows, E = 4, 8, 16, 32, 1 seed",
        "seeds": [0],
        "overrides": [],
        "runs": {
            f"{method}-E{e}": {
                "preset": f"{method}-tiny",
                "overrides": [f"model.ffn.num_experts={e}", "model.ffn.top_k=1"],
            }
            for method in ("topk", "remoe")
            for e in (4, 8, 16, 32)
        },
    },
    "load-balance": {
        "description": "expert load with and without load balancing: TopK with / without the "
        "Switch loss, ReMoE with load-balanced / plain L1, 1 seed",
        "seeds": [0],
        "overrides": [],
        "runs": {
            "topk-balanced": {"preset": "topk-tiny", "overrides": []},
            "topk-unbalanced": {"preset": "topk-tiny", "overrides": ["model.ffn.balance_coef=0"]},
            "remoe-balanced-l1": {"preset": "remoe-tiny", "overrides": []},
            "remoe-plain-l1": {
                "preset": "remoe-tiny",
                "overrides": ["model.ffn.l1_balanced=false"],
            },
        },
    },
    "routers": {
        "description": "the routing literature on equal terms: ReMoE's Table 2 baselines (dense, "
        "TopK, Expert Choice, Hash, SparseMixer-v2, Lory) and token-adaptive / cross-layer "
        "routers, from topk-tiny (E=8, k=1) at matched active parameters, 250 steps",
        "seeds": [0, 1, 2],
        "overrides": ["train.steps=250"],
        "runs": {
            name: {"preset": preset, "overrides": overrides}
            for name, preset, overrides in ROUTER_RUNS
        },
        # the paper whose baselines these runs rerun: its method's run and the baseline runs
        # (ReMoE Table 2: 182M active parameters, E=8, k=1); the claims compare them
        "paper": {
            "name": "ReMoE Table 2",
            "method": "remoe",
            "baselines": ["topk", "expert_choice", "hash", "sparsemixer", "lory"],
        },
    },
}


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

    The runs of one suite must come from one version of the code and one plan: kept runs trained
    by another commit (or from a tree with uncommitted changes while this one is clean, or the
    reverse) are refused before anything trains, and so is a finished suite whose runs disagree,
    unless ``allow_mixed`` (the report then says so at the top); kept runs whose config differs
    from the plan's (another ``steps`` or override) are always refused. ``out_dir/suite.json``
    records the suite, the command, steps, seeds, overrides, timings and this process's
    provenance. ``jobs > 1`` trains that many runs at once, each in its own process (logs in
    ``out_dir/logs/``).
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
    if not allow_mixed:
        kept = {
            p.run_dir.name: RunDir(p.run_dir).provenance()
            for p in plan
            if RunDir(p.run_dir).holds_run
        }
        if kept:
            check_same_code({"this process": [here], **kept}, False, str(out / RUNS_SUBDIR))
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
    train_seconds = time.time() - t0
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
        report_seconds=round(time.time() - t0 - train_seconds, 1),
        finished=now(),
        warnings=res["warnings"],
    )
    write_record(out, record)
    res["train_seconds"] = train_seconds
    return res
