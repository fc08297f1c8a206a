"""The report's tables: runs side by side and the headline routing numbers, mean ± sample SD
(ddof=1) over seeds.

Cells are plain strings, so the same rows render to Markdown and HTML
(:mod:`moelab.analysis.render`).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from moelab.analysis.compute import measured_flops_per_token
from moelab.analysis.runs import RunRecord
from moelab.analysis.stats import mean_std

Results = dict[str, Any]  # one run's analysis results (RunAnalysis.results)


def _si(x: float) -> str:
    for div, unit in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= div:
            return f"{x / div:.3g}{unit}"
    return f"{x:.0f}"


def _pm(values: list[Any], digits: int = 3, si: bool = False) -> str:
    v = [float(x) for x in values if x is not None]
    m, s = mean_std(v)
    if not math.isfinite(m):
        return "–"
    f = _si if si else (lambda x: f"{x:.{digits}f}")
    if len(v) == 1 or s == 0:
        return f(m)
    return f"{f(m)} ± {f(s)}"


def group_runs(records: list[RunRecord], groups: dict[str, list[str]] | None) -> dict[str, list]:
    """``group name → records``; explicit ``groups`` map names to run directories, otherwise runs
    are grouped by their name without a ``-seedN`` suffix. Order follows first appearance."""
    if groups:
        by_path = {str(r.path.resolve()): r for r in records}
        return {
            g: [by_path[str(Path(p).expanduser().resolve())] for p in dirs]
            for g, dirs in groups.items()
        }
    out: dict[str, list[RunRecord]] = {}
    for r in records:
        out.setdefault(r.group, []).append(r)
    return out


def runs_table(grouped: dict[str, list[RunRecord]]) -> list[list[str]]:
    """The main table: method, params, measured FLOPs/token, tokens, final val loss/ppl (overall
    and per domain) and throughput, mean ± std over each group's seeds."""
    domains: list[str] = []
    for recs in grouped.values():
        for r in recs:
            for d in r.final_val()["val_loss_by_domain"]:
                if d not in domains:
                    domains.append(d)
    header = [
        "run",
        "method",
        "seeds",
        "active params",
        "total params",
        "measured FLOPs/token",
        "tokens",
        "val loss",
        "val ppl",
        *[f"loss: {d}" for d in domains],
        "tokens/s",
    ]
    rows = [header]
    for g, recs in grouped.items():
        p = [r.summary.get("params") or {} for r in recs]
        fv = [r.final_val() for r in recs]
        methods = sorted({r.method for r in recs})
        rows.append(
            [
                g,
                "/".join(methods),
                str(len(recs)),
                _pm([x.get("active_params") for x in p], si=True),
                _pm([x.get("total_params") for x in p], si=True),
                _pm([measured_flops_per_token(r) for r in recs], si=True),
                _pm(
                    [
                        r.summary.get("tokens") or (r.train[-1].get("tokens") if r.train else None)
                        for r in recs
                    ],
                    si=True,
                ),
                _pm([f["val_loss"] for f in fv], 4),
                _pm([f["val_ppl"] for f in fv], 2),
                *[_pm([f["val_loss_by_domain"].get(d) for f in fv], 4) for d in domains],
                _pm([r.summary.get("tokens_per_s") for r in recs], si=True),
            ]
        )
    return rows


def assignment_flips(res: Results) -> float | None:
    """The flip rate a report shows: the assignment flip rate, mean over layers (recomputed from
    the per-layer values for analyses saved before the mean was)."""
    st = res["stability"]
    if st.get("mean_assignment_flip_rate") is not None:
        return float(st["mean_assignment_flip_rate"])
    v = [x["assignment_flip_rate"] for x in st["layers"].values()]
    return float(np.mean(v)) if v else None


def analysis_table(grouped: dict[str, list[Results]]) -> list[list[str]]:
    """Per group, mean ± sample SD (ddof=1) over seeds of the headline routing numbers."""
    header = [
        "run",
        "settle step",
        "sparsity after settling (target)",
        "dead experts",
        "active experts/token",
        "rare − frequent active",
        "domain KL (nats)",
        "usage",
        "unevenness",
        "flip rate",
    ]
    rows = [header]
    for g, runs in grouped.items():

        def col(fn: Any, runs: list[Results] = runs) -> list[Any]:
            vals = []
            for res in runs:
                try:
                    vals.append(fn(res))
                except (KeyError, TypeError, ValueError, ZeroDivisionError):
                    vals.append(None)
            return vals

        def layer_mean(res: dict, key: str, field_: str) -> float | None:
            v = [x.get(field_) for x in res[key].values() if x.get(field_) is not None]
            return float(np.mean(v)) if v else None

        def rare(res: dict) -> float | None:
            v = [
                x["by_frequency"]["rare_minus_frequent"]
                for x in res["compute"].values()
                if x.get("by_frequency") and x["by_frequency"]["rare_minus_frequent"] is not None
            ]
            return float(np.mean(v)) if v else None

        targets = col(lambda r: r["dynamics"]["stages"]["target"])
        target = next((t for t in targets if t is not None), None)
        settled_means = col(lambda r: r["dynamics"]["stages"]["settled_mean"])
        settled = _pm(settled_means, 4)
        stages = ((runs[0].get("dynamics") or {}).get("stages") or {}) if len(runs) == 1 else {}
        within = stages.get("settled_std")
        if settled_means[0] is not None and within is not None:  # one seed: SD over steps
            settled += f" (SD over steps {within:.4f})"
        if target is not None:
            settled += f" ({target:.3f})"
        rows.append(
            [
                g,
                _pm(col(lambda r: r["dynamics"]["stages"]["settle_step"]), 0),
                settled,
                _pm(
                    col(
                        lambda r: layer_mean(
                            r, "load" if "load" in r else "train_load", "dead_fraction"
                        )
                    ),
                    3,
                ),
                _pm(col(lambda r: layer_mean(r, "compute", "mean")), 3),
                _pm(col(rare), 3),
                _pm(col(lambda r: r["domains"]["mean_kl"]), 4),
                _pm(col(lambda r: layer_mean(r, "usage", "usage")), 3),
                _pm(col(lambda r: layer_mean(r, "usage", "unevenness")), 3),
                _pm(col(assignment_flips), 3),
            ]
        )
    return rows


def eval_loss_table(grouped: dict[str, list[Results]]) -> list[list[str]] | None:
    """Per group, the analysis pass's loss per domain (mean ± SD over seeds); None if no run
    had an analysis pass."""
    domains: list[str] = []
    for runs in grouped.values():
        for res in runs:
            for d in res.get("eval_loss_by_domain", {}):
                if d not in domains:
                    domains.append(d)
    if not domains:
        return None
    rows = [["run", "tokens", "all", *domains]]
    for g, runs in grouped.items():
        with_pass = [res for res in runs if "eval_loss_by_domain" in res]
        if not with_pass:
            continue
        rows.append(
            [
                g,
                _pm([res["eval_tokens"] for res in with_pass], si=True),
                _pm([res.get("eval_loss") for res in with_pass], 4),
                *[
                    _pm([res["eval_loss_by_domain"].get(d) for res in with_pass], 4)
                    for d in domains
                ],
            ]
        )
    return rows
