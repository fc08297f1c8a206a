"""Measured compute of a run: the forward FLOPs its training steps really spent.

The nominal ``flops_per_token`` of :func:`moelab.model.accounting` assumes every token runs
``top_k`` experts in every routed layer. ReMoE, top-p, null / MoE++ experts, Expert Choice and
capacity drops make the real count differ, by +40% or more (top-p at p=0.4 ran ~5 half-width
experts where the nominal count says 2), so a comparison "at equal active compute" must read what
was spent. Three sources, best first (:attr:`MeasuredCompute.source`):

* ``"logged"``: the run's metrics lines carry ``flops_total`` (cumulative measured forward FLOPs,
  from the layers' own ``expert_flops``);
* ``"derived"``: runs trained before that was logged: each logged line's per-layer experts per
  token (``active_mean``) times the config's per-assignment FLOPs, plus the routing-independent
  FLOPs, held for the ``log_every`` steps the line stands for. An estimate from the logged steps;
  Lory (one merged expert per token, whatever its decision lists) keeps its nominal count;
* ``"nominal"``: runs with no routed layer (exact) or nothing to derive from.

:func:`compute_matched` is the rule for "at equal active compute": measured FLOPs per token
within :data:`COMPUTE_TOLERANCE`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from moelab.analysis.runs import RunRecord
from moelab.rundir import RunDir

COMPUTE_TOLERANCE = 0.05  # "equal active compute": measured FLOPs/token within 5%

SOURCE_NOTE = {
    "logged": "logged by training (flops_total over tokens)",
    "derived": "derived from the logged active experts per layer at every logged step (runs "
    "trained before flops_total was logged)",
    "nominal": "the nominal count for runs without a routed layer (exact there) or without "
    "logged routing to derive it from",
}


@dataclass(frozen=True)
class MeasuredCompute:
    """A run's measured forward FLOPs: per training token, and cumulative against the step."""

    flops_per_token: float
    nominal_per_token: float
    source: str  # "logged", "derived" or "nominal"
    steps: np.ndarray  # steps, starting at 0
    cumulative: np.ndarray  # measured forward FLOPs spent up to each step

    def at_steps(self, steps: np.ndarray | list[float]) -> np.ndarray:
        """Cumulative measured FLOPs at ``steps`` (linear between logged steps)."""
        return np.interp(np.asarray(steps, dtype=np.float64), self.steps, self.cumulative)

    @property
    def ratio_to_nominal(self) -> float:
        return self.flops_per_token / self.nominal_per_token


def _nominal(rec: RunRecord) -> float | None:
    v = (rec.summary.get("params") or {}).get("flops_per_token")
    acc = Path(rec.path) / RunDir.ACCOUNTING
    if v is None and acc.is_file():
        v = json.loads(acc.read_text("utf-8")).get("flops_per_token")
    return None if v is None else float(v)


def _tokens_per_step(rec: RunRecord) -> float | None:
    for line in reversed(rec.train):
        if line.get("tokens") and line.get("step"):
            return float(line["tokens"]) / float(line["step"])
    s = rec.summary
    return float(s["tokens"]) / float(s["steps"]) if s.get("tokens") and s.get("steps") else None


def _config_accounting(rec: RunRecord) -> tuple[dict[str, Any], set[str]] | None:
    """The run config's accounting and the blocks whose layer merges its experts (Lory)."""
    from moelab.layers.routers import router_class
    from moelab.layers.routers.lory import LoryRouter
    from moelab.model import ModelConfig, accounting

    raw = RunDir(rec.path).raw_config()
    try:
        cfg = ModelConfig.from_dict(raw.get("model", {}))
        acc = accounting(cfg)
    except (ValueError, TypeError, KeyError):  # an older config that no longer validates
        return None
    merging = set()
    for i in range(cfg.n_layers):
        router = getattr(cfg.ffn_for(i), "router", None)
        if router is not None and issubclass(router_class(router), LoryRouter):
            merging.add(str(i))
    return acc, merging


def measured_compute(rec: RunRecord) -> MeasuredCompute | None:
    """The run's measured compute (see the module docstring); None without a nominal count or
    any training line."""
    nominal = _nominal(rec)
    per_step = _tokens_per_step(rec)
    if nominal is None or per_step is None or not rec.train:
        return None
    logged = [ln for ln in rec.train if ln.get("flops_total") is not None and ln.get("step")]
    if logged:
        steps = np.array([0.0, *(float(ln["step"]) for ln in logged)])
        cum = np.array([0.0, *(float(ln["flops_total"]) for ln in logged)])
        return MeasuredCompute(cum[-1] / (steps[-1] * per_step), nominal, "logged", steps, cum)
    derived = _derived(rec, nominal, per_step)
    if derived is not None:
        return derived
    steps = np.array([0.0, *(float(ln["step"]) for ln in rec.train if ln.get("step"))])
    return MeasuredCompute(nominal, nominal, "nominal", steps, steps * per_step * nominal)


def _derived(rec: RunRecord, nominal: float, per_step: float) -> MeasuredCompute | None:
    found = _config_accounting(rec)
    if found is None:
        return None
    acc, merging = found
    rows = {str(r["block"]): r for r in acc.get("routed_layers", [])}
    if not rows or not any(ln.get("layers") for ln in rec.train):
        return None
    if acc["flops_per_token"] != nominal:  # the config no longer counts as the run did
        return None
    fixed = nominal - acc["routed_flops_per_token"]
    steps, cum, prev, total = [0.0], [0.0], 0.0, 0.0
    for line in rec.train:
        step = float(line.get("step") or 0)
        if step <= prev:
            continue
        layers = line.get("layers") or {}
        per_token = fixed
        for key, row in rows.items():
            st = layers.get(key) or {}
            n = row["assignments_per_token"]
            if key not in merging and st.get("active_mean") is not None and st.get("num_tokens"):
                # num_tokens counts every pass (Chain-of-Experts: iterations × tokens)
                n = float(st["active_mean"]) * float(st["num_tokens"]) / per_step
            per_token += n * row["assignment_flops"]
        total += (step - prev) * per_step * per_token
        steps.append(step)
        cum.append(total)
        prev = step
    return MeasuredCompute(
        total / (prev * per_step), nominal, "derived", np.array(steps), np.array(cum)
    )


def si(x: float | None) -> str:
    """``3.83M``, ``1.2T``: FLOP counts of every size in at most four characters and a unit."""
    if x is None or not np.isfinite(x):
        return "–"
    for div, unit in ((1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= div:
            return f"{x / div:.3g}{unit}"
    return f"{x:.0f}"


def measured_flops_per_token(rec: RunRecord) -> float | None:
    mc = measured_compute(rec)
    return None if mc is None else mc.flops_per_token


def compute_matched(a: list[RunRecord], b: list[RunRecord]) -> tuple[float, bool] | None:
    """``(relative difference, within tolerance)`` of two groups' mean measured FLOPs per token
    (``a`` over ``b`` − 1): a claim "at equal active compute" holds only when within
    :data:`COMPUTE_TOLERANCE`; otherwise it must be stated per unit of measured compute."""
    fa = [v for v in map(measured_flops_per_token, a) if v is not None]
    fb = [v for v in map(measured_flops_per_token, b) if v is not None]
    if not fa or not fb:
        return None
    diff = float(np.mean(fa)) / float(np.mean(fb)) - 1
    return diff, abs(diff) <= COMPUTE_TOLERANCE


def sources(records: list[RunRecord]) -> list[str]:
    """The sources of the runs' measured compute, in the order of :data:`SOURCE_NOTE`."""
    found = {mc.source for mc in map(measured_compute, records) if mc is not None}
    return [s for s in SOURCE_NOTE if s in found]


def source_sentence(records: list[RunRecord]) -> str:
    """One sentence saying where the measured FLOPs of ``records`` come from."""
    found = sources(records)
    if not found:
        return ""
    return (
        "Measured FLOPs/token (forward, per training token): "
        + "; ".join(SOURCE_NOTE[s] for s in found)
        + "."
    )


def compute_text(records: list[RunRecord]) -> str:
    """The report's note on its FLOPs columns: what they count and where they come from."""
    return (
        source_sentence(records)
        + " The nominal count (moelab.model.accounting, k experts per token) is in each run's "
        'accounting.json; losses compared "at equal active compute" need measured FLOPs/token '
        f"within {100 * COMPUTE_TOLERANCE:.0f}%."
    )


def plot_loss_vs_flops(grouped: dict[str, list[RunRecord]], path: str | Path) -> Path | None:
    """Validation loss against cumulative measured forward FLOPs, every run of every group
    (the group's first seed labelled); None when no run has both."""
    from matplotlib.ticker import FuncFormatter, MaxNLocator

    from moelab.analysis.figures import pyplot, save_png

    points = {}
    for g, recs in grouped.items():
        for r in recs:
            mc = measured_compute(r)
            ev = [e for e in r.evals if e.get("val_loss") is not None and e.get("step")]
            if mc is not None and ev:
                x = mc.at_steps([float(e["step"]) for e in ev])
                points.setdefault(g, []).append((x, [float(e["val_loss"]) for e in ev]))
    if not points:
        return None
    plt = pyplot()
    fig, ax = plt.subplots(1, 1, figsize=(8, 4.2))
    many = len(points) > 10  # tab10 would repeat colours: tab20 and a second marker
    cmap = plt.get_cmap("tab20")
    for i, (g, runs) in enumerate(points.items()):
        # dark hues first, then their light twins with another marker
        color = cmap((2 * i) % 20 + (i // 10) % 2) if many else f"C{i}"
        marker = "os^D"[(i // 10) % 4] if many else "o"
        for j, (x, y) in enumerate(runs):
            ax.plot(
                x,
                y,
                marker + "-",
                ms=4,
                lw=1.0,
                alpha=1.0 if j == 0 else 0.4,
                color=color,
                label=g if j == 0 else None,
            )
    ax.set_xlabel("cumulative measured forward FLOPs (training)")
    ax.set_ylabel("validation loss (nats/token)")
    ax.set_title("validation loss against measured compute")
    ax.legend(fontsize=7)
    ax.xaxis.set_major_locator(MaxNLocator(nbins=6))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _pos: si(v)))
    fig.tight_layout()
    return save_png(fig, path)
