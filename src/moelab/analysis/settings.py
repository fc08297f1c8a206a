"""What differs between compared runs: a run-settings table (experts, k, granularity, shared
experts, learning rate, data, tokens seen, active FLOPs) with the differing cells highlighted, and
the warnings a reader needs before reading a loss table side by side (issue #9, item 12).

A loss table alone hides that two rows saw three times as many tokens, or spend more compute per
token, or trained on other data: each of those moves the loss by itself. The settings table puts
those facts next to each row, and :func:`comparability_warnings` says so in words when they differ
by more than the tolerances below.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from moelab.analysis.compute import COMPUTE_TOLERANCE, measured_flops_per_token, sources
from moelab.analysis.origin import Provenance
from moelab.analysis.runs import RunRecord
from moelab.config import flatten
from moelab.rundir import RunDir

FLOPS_TOLERANCE = COMPUTE_TOLERANCE  # measured FLOPs/token within 5% count as matched
TOKENS_RATIO = 1.5  # tokens seen may differ by 1.5× before the comparison is flagged

# config keys shown in their own columns (or implied by the method column / the seeds)
_SHOWN = {
    "model.ffn.kind",
    "model.ffn.router",
    "model.ffn.num_experts",
    "model.ffn.num_memories",
    "model.ffn.top_k",
    "model.ffn.heads",
    "model.ffn.granularity",
    "model.ffn.shared_experts",
    "optim.lr",
    "train.steps",
    "train.seed",
    "data.seed",
    "data.path",
}


def _si(x: float) -> str:
    for div, unit in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= div:
            return f"{x / div:.3g}{unit}"
    return f"{x:.0f}"


def flops(rec: RunRecord) -> float | None:
    """Measured forward FLOPs per training token (:mod:`moelab.analysis.compute`): what the
    run spent, not the nominal ``top_k`` count (ReMoE, top-p, null experts differ from it)."""
    return measured_flops_per_token(rec)


def tokens_seen(rec: RunRecord) -> float | None:
    v = rec.summary.get("tokens") or (rec.train[-1].get("tokens") if rec.train else None)
    return None if v is None else float(v)


def _data_sha(records: list[dict[str, Any]]) -> list[str]:
    return sorted({r["data_sha256"] for r in records if r.get("data_sha256")})


def started_from(records: list[dict[str, Any]]) -> str | None:
    """``"prune of demo@step_00000300"``: the command and source run (or checkpoint directory)
    whose weights a run started from (``convert-hf``, ``upcycle``, ``prune``); None for a run
    trained from its own initialisation."""
    origin = records[0].get("origin") if records else None
    if not origin:
        return None
    where = Path(str(origin.get("source", "?"))).name
    if origin.get("checkpoint"):
        where += f"@{origin['checkpoint']}"
    return f"{origin.get('command', '?')} of {where}"


def run_settings(rec: RunRecord, records: list[dict[str, Any]]) -> dict[str, str]:
    """One run's settings as display strings (``–`` where a setting does not apply or is not
    recorded), from its config, summary and provenance."""
    cfg = flatten(RunDir(rec.path).raw_config())
    kind = cfg.get("model.ffn.kind")

    def get(key: str) -> str:
        v = cfg.get(key)
        return "–" if v is None else f"{v:g}" if isinstance(v, float) else str(v)

    experts = get("model.ffn.num_memories" if kind == "pkm" else "model.ffn.num_experts")
    k = get("model.ffn.top_k")
    if kind in ("peer", "pkm") and cfg.get("model.ffn.heads") is not None:
        k = f"{get('model.ffn.heads')}×{k}"
    data = cfg.get("data.path")
    data = "embedded corpus" if data is None and "data.path" in cfg else (data or "?")
    shas = _data_sha(records)
    if shas:
        data += " (sha256 " + " → ".join(s[:12] for s in shas) + ")"
    fl, tok = flops(rec), tokens_seen(rec)
    steps = rec.summary.get("steps") or (rec.train[-1].get("step") if rec.train else None)
    origin = started_from(records)
    return ({"from": origin} if origin else {}) | {
        "method": rec.method,
        "E": experts,
        "k": k,
        "granularity": get("model.ffn.granularity") if kind == "moe" else "–",
        "shared experts": get("model.ffn.shared_experts") if kind == "moe" else "–",
        "lr": get("optim.lr"),
        "steps": "–" if steps is None else str(steps),
        "tokens seen": "–" if tok is None else _si(tok),
        "measured FLOPs/token": "–" if fl is None else _si(fl),
        "data": data,
    }


def _other_differences(records: list[RunRecord]) -> dict[str, dict[str, str]]:
    """Config keys not shown in a column whose value differs between the runs that set them:
    ``run name → {key: value}`` (e.g. ``model.ffn.balance_coef`` 0.01 vs 0 in the load-balance
    suite). A key only some kinds of layer have is compared among the runs that have it (``–``
    for the others)."""
    flats = {r.name: flatten(RunDir(r.path).raw_config()) for r in records}
    keys = sorted({k for f in flats.values() for k in f} - _SHOWN)
    differing = [k for k in keys if len({repr(f[k]) for f in flats.values() if k in f}) > 1]
    return {n: {k: str(f[k]) if k in f else "–" for k in differing} for n, f in flats.items()}


def settings_table(
    grouped: dict[str, list[RunRecord]], provenance: Provenance
) -> tuple[list[list[str]], set[tuple[int, int]]]:
    """Rows (one per group; seeds that disagree read ``a / b``) and the cells to highlight: every
    cell of a column whose value is not the same in all rows."""
    all_recs = [r for recs in grouped.values() for r in recs]
    other = _other_differences(all_recs)
    other_keys = sorted({k for v in other.values() for k in v})
    derived = any(started_from(provenance.get(r.name, [])) for r in all_recs)
    header = ["run", "seeds", *(["from"] if derived else [])]
    header += [*run_settings(all_recs[0], []).keys(), *other_keys]
    rows = [header]
    for g, recs in grouped.items():
        per_run = [
            run_settings(r, provenance.get(r.name, [])) | other.get(r.name, {}) for r in recs
        ]
        cells = [g, str(len(recs))]
        for col in header[2:]:
            seen: list[str] = []
            for s in per_run:
                if s.get(col, "–") not in seen:
                    seen.append(s.get(col, "–"))
            cells.append(" / ".join(seen))
        rows.append(cells)
    highlight = set()
    for j in range(2, len(header)):
        column = [row[j] for row in rows[1:]]
        if len(set(column)) > 1 or any(" / " in c for c in column):
            highlight |= {(i, j) for i in range(1, len(rows))}
    return rows, highlight


def comparability_warnings(records: list[RunRecord], provenance: Provenance) -> list[str]:
    """Warnings for runs that should not sit side by side without a caveat: measured FLOPs/token
    differing by more than 5%, tokens seen differing by more than 1.5×, different data."""
    out = []

    def spread(values: dict[str, float | None]) -> tuple[str, float, str, float] | None:
        v = {n: x for n, x in values.items() if x is not None and math.isfinite(x) and x > 0}
        if len(v) < 2:
            return None
        lo, hi = min(v, key=v.__getitem__), max(v, key=v.__getitem__)
        return lo, v[lo], hi, v[hi]

    s = spread({r.name: flops(r) for r in records})
    if s and s[3] / s[1] - 1 > FLOPS_TOLERANCE:
        out.append(
            f"measured forward FLOPs per token differ by {100 * (s[3] / s[1] - 1):.0f}% "
            f"({s[0]} {_si(s[1])}, {s[2]} {_si(s[3])}; matched means within "
            f"{100 * FLOPS_TOLERANCE:.0f}%): the runs do not spend the same compute per "
            "token, so their losses are not a like-for-like comparison"
            + (
                " (measured FLOPs derived from the logged active experts per layer)"
                if "derived" in sources(records)
                else ""
            )
        )
    s = spread({r.name: tokens_seen(r) for r in records})
    if s and s[3] / s[1] > TOKENS_RATIO:
        out.append(
            f"tokens seen differ {s[3] / s[1]:.1f}× ({s[0]} {_si(s[1])}, {s[2]} "
            f"{_si(s[3])}): a run that saw more tokens has a lower loss for that reason "
            "alone"
        )
    for r in records:
        origin = started_from(provenance.get(r.name, []))
        if origin:
            out.append(
                f"{r.name} started from other weights ({origin}): its tokens seen and steps "
                "count only its own training, not what produced those weights"
            )
    shas: dict[str, list[str]] = {}
    for r in records:
        for sha in _data_sha(provenance.get(r.name, [])):
            shas.setdefault(sha, []).append(r.name)
    if len(shas) > 1:
        parts = "; ".join(f"sha256 {sha[:12]}: {', '.join(n)}" for sha, n in shas.items())
        out.append(
            f"the runs trained on different data ({parts}): their losses are measured on "
            "different tokens"
        )
    return out
