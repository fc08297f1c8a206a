"""The plot sections of a report: training curves, routing plots per run group, top tokens.

Kept apart from :mod:`moelab.analysis.report` (which computes the analyses and assembles the
report) so that a report can also be re-drawn from a saved ``analysis.json`` (see
:func:`moelab.analysis.report.write_report`).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from moelab.analysis import plots
from moelab.analysis.compute import plot_loss_vs_flops
from moelab.analysis.figures import compact_png
from moelab.analysis.render import Section
from moelab.analysis.runs import RunAnalysis, RunRecord, training_curves
from moelab.analysis.stats import SparsityStages


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)


def plot_sections(
    grouped: dict[str, list[RunRecord]],
    results: dict[str, RunAnalysis],
    img_dir: Path,
    keep_drawn: bool = False,
) -> list[Section]:
    """Plots of each group's first run (the representative seed), plus cross-run comparisons.

    ``keep_drawn``: a report redrawn from ``analysis.json`` keeps the PEER/PKM usage plot already
    in ``img_dir``, since the raw gate masses it draws are not saved."""
    secs: list[Section] = []
    curves = {g: training_curves(recs[0]) for g, recs in grouped.items()}
    imgs = [plots.plot_loss_curves(curves, img_dir / "loss_curves.png")]
    finals = {
        g: [float(r.final_val()["val_loss"]) for r in recs if r.final_val()["val_loss"] is not None]
        for g, recs in grouped.items()
    }
    if any(math.isfinite(v) for vals in finals.values() for v in vals):
        imgs.append(
            plots.plot_metric_bars(
                finals,
                "validation loss (nats/token)",
                "final validation loss",
                img_dir / "final_val_loss.png",
            )
        )
    by_flops = plot_loss_vs_flops(grouped, img_dir / "loss_vs_flops.png")
    if by_flops is not None:
        imgs.append(by_flops)
    few = min((c.val_loss.size for c in curves.values()), default=0)
    text = (
        "Training LM loss against tokens seen: thin lines are the logged values, thick lines "
        "their moving average. "
    )
    if few < plots.MIN_CURVE_POINTS:
        text += (
            f"Validation loss was measured only {few} time(s) per run, too few for a curve: "
            "the evaluations are drawn as separate points. "
        )
    if by_flops is not None:
        text += (
            "Validation loss against cumulative measured forward FLOPs of training (every seed; "
            "the first seed labelled): a run that spent more compute per token sits further "
            "right at the same step. "
        )
    text += (
        "Bars start at zero; the numbers on them are mean ± sample SD (ddof=1) over seeds (a "
        "single seed has no error bar), the dots the individual seeds."
    )
    secs.append(Section("Loss curves", text, images=imgs))

    dyn, load, comp, dom, use = [], [], [], [], []
    z_all: dict[str, np.ndarray] = {}
    for g, recs in grouped.items():
        ra = results[str(recs[0].path)]
        r = ra.results
        stem = _safe(g)
        d = r.get("dynamics", {})
        if "stages" in d:
            st = SparsityStages(
                **{
                    k: (float("nan") if v is None and k.startswith("settled") else v)
                    for k, v in d["stages"].items()
                }
            )
            dyn.append(
                plots.plot_dynamics(
                    curves[g], st, f"{g}: ReMoE training dynamics", img_dir / f"dynamics_{stem}.png"
                )
            )
        if r.get("load") and any(v.get("load_fraction") for v in r["load"].values()):
            load.append(
                plots.plot_expert_load(
                    r["load"], f"{g}: expert load (validation)", img_dir / f"load_{stem}.png"
                )
            )
        elif r.get("train_load"):
            load.append(
                plots.plot_expert_load(
                    r["train_load"],
                    f"{g}: expert load (last logged training step)",
                    img_dir / f"load_{stem}.png",
                )
            )
        if r.get("compute"):
            comp.append(
                plots.plot_active_by_frequency(
                    r["compute"], f"{g}: dynamic compute", img_dir / f"compute_{stem}.png"
                )
            )
        if r.get("domains", {}).get("layers") and len(r["domains"]["domains"]) > 1:
            dom.append(plots.plot_domain_shares(r["domains"], g, img_dir / f"domains_{stem}.png"))
        for lk, lt_use in (r.get("usage") or {}).items():
            if lt_use["kind"] in ("peer", "pkm") and lk in ra.z_primes:
                z_all[f"{g} layer {lk}"] = ra.z_primes[lk]
    if z_all:
        use.append(plots.plot_usage(z_all, "PEER/PKM", img_dir / "usage_peer.png"))
    elif keep_drawn and (img_dir / "usage_peer.png").is_file():
        kept = img_dir / "usage_peer.png"  # redrawn report: its gate masses are not saved
        kept.write_bytes(compact_png(kept.read_bytes()))  # as small as a new plot
        use.append(kept)
    text = {
        "Training dynamics": "Shaded: ReMoE's stages (red dense, yellow sparsifying, green "
        "stable); dashed: target sparsity; dotted: settling step.",
        "Expert load": "Share of each layer's (token, expert) assignments per expert on "
        "validation data. TopK runs carry a load-balancing loss; ReMoE's L1 is load-balanced.",
        "Dynamic compute": "Active experts per token by training-frequency bin of the token.",
        "Domain specialisation": "Share of each domain's routed tokens going to each expert.",
        "Expert usage (PEER/PKM)": "Experts sorted by gate mass z' = Σ_x g_i(x) on validation.",
    }
    for title, ims in (
        ("Training dynamics", dyn),
        ("Expert load", load),
        ("Dynamic compute", comp),
        ("Domain specialisation", dom),
        ("Expert usage (PEER/PKM)", use),
    ):
        if ims:
            secs.append(Section(title, text[title], images=ims))
    tops = []
    for g, recs in grouped.items():
        r = results[str(recs[0].path)].results
        for lk, rows in (r.get("top_tokens") or {}).items():
            for e, row in enumerate(rows[:16]):
                toks = " ".join(repr(t["text"]) for t in row[:6])
                tops.append([g, lk, str(e), toks])
            break  # first routed layer only; analysis.json has all
    if tops:
        secs.append(
            Section(
                "Top tokens per expert",
                "Tokens routed with the highest mean gate weight (first routed layer).",
                [["run", "layer", "expert", "tokens"], *tops],
            )
        )
    return secs
