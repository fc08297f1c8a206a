"""Named experiment suites for ``moelab compare``: data (run name → preset + overrides), plus the
small driver that trains each (run, seed) with the training library and writes one report.

A suite is a plain dict so that adding one is a few lines of data, not code:

    {"description": str, "seeds": [0, 1, 2], "overrides": [...],   # applied to every run
     "runs": {"name": {"preset": "topk-tiny", "overrides": ["model.ffn.num_experts=16"]}}}

Seeds set both ``train.seed`` (initialisation) and ``data.seed`` (training-window stream).
"""

from __future__ import annotations

import copy
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from moelab.analysis.report import build_report
from moelab.rundir import RunDir
from moelab.train import resolve_run_config, train

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
            "remoe-plain-l1": {"preset": "remoe-tiny",
                               "overrides": ["model.ffn.l1_balanced=false"]},
        },
    },
}


@dataclass(frozen=True)
class PlannedRun:
    """One training run of a suite: its group name, seed, directory and full override list."""

    group: str
    seed: int
    run_dir: Path
    preset: str
    overrides: tuple[str, ...]


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
    runs_dir = Path(out_dir).expanduser() / "runs"
    plan = []
    for seed in seeds:
        for group, spec in suite["runs"].items():
            ov = (*spec.get("overrides", []), *common, f"train.seed={seed}", f"data.seed={seed}")
            plan.append(PlannedRun(group, seed, runs_dir / f"{group}-seed{seed}", spec["preset"],
                                   tuple(ov)))
    return plan


def _default_trainer() -> Callable[[PlannedRun], Any]:
    """Train one planned run with ``moelab.train``: a run stopped after a checkpoint resumes, one
    stopped before its first checkpoint starts again."""

    def run(p: PlannedRun) -> Any:
        cfg = resolve_run_config(preset=p.preset, overrides=list(p.overrides))
        rundir = RunDir(p.run_dir)
        started = rundir.holds_run
        resume = started and rundir.has_latest
        return train(cfg, p.run_dir, resume=resume, overwrite=started and not resume,
                     preset=p.preset)

    return run


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
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Train every run of suite ``name`` under ``out_dir/runs/`` (runs that completed, i.e. have
    a summary, are kept, so an interrupted suite resumes), then write the report to ``out_dir``
    (``report.md``, ``report.html``) with seeds averaged per run name."""
    plan = plan_suite(name, out_dir, seeds, steps, extra_overrides)
    trainer = trainer or _default_trainer()
    out = Path(out_dir).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    (out / "suite.json").write_text(json.dumps({
        "suite": name, "definition": get_suite(name), "seeds": sorted({p.seed for p in plan}),
        "runs": [{"group": p.group, "seed": p.seed, "run_dir": str(p.run_dir),
                  "preset": p.preset, "overrides": list(p.overrides)} for p in plan],
    }, indent=1), "utf-8")
    t0 = time.time()
    for i, p in enumerate(plan, 1):
        if RunDir(p.run_dir).has_summary:
            log(f"[{i}/{len(plan)}] {p.run_dir.name}: done already, kept")
            continue
        log(f"[{i}/{len(plan)}] {p.run_dir.name}: training ({p.preset} {' '.join(p.overrides)})")
        t = time.time()
        trainer(p)
        log(f"[{i}/{len(plan)}] {p.run_dir.name}: {time.time() - t:.0f} s")
    groups: dict[str, list[str]] = {}
    for p in plan:
        groups.setdefault(p.group, []).append(str(p.run_dir))
    res = build_report([p.run_dir for p in plan], out, groups=groups, analyze=analyze,
                       settings=report_settings,
                       title=f"moelab compare: {name} — {get_suite(name)['description']}")
    res["train_seconds"] = time.time() - t0
    return res
