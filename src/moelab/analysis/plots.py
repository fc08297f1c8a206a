"""PNG plots of the analyses (matplotlib, Agg backend, imported lazily).

matplotlib is the optional ``analysis`` extra: every statistic works without it, and only these
functions raise a clear error when it is missing. Each function writes one PNG and returns its path.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from moelab.analysis.figures import pyplot as _plt
from moelab.analysis.figures import save_png as _save
from moelab.analysis.runs import TrainingCurves
from moelab.analysis.stats import SparsityStages

STAGE_COLORS = {"dense": "#f4cccc", "sparsifying": "#fff2cc", "stable": "#d9ead3"}
# Fewer evaluations than this are drawn as separate points, not as a curve: two or three points
# joined by lines look like a measured trend that was never measured.
MIN_CURVE_POINTS = 5


def _shade_stages(
    ax: Any, steps: np.ndarray, stages: SparsityStages | None, label: bool = True
) -> None:
    if stages is None or stages.dense_end is None or not steps.size:
        return
    first, last = float(steps[0]), float(steps[-1])
    settle = stages.settle_step
    spans = [("dense", first, float(stages.dense_end))]
    spans.append(("sparsifying", float(stages.dense_end), float(settle if settle else last)))
    if settle is not None:
        spans.append(("stable", float(settle), last))
    for name, a, b in spans:
        if b > a:
            ax.axvspan(
                a,
                b,
                color=STAGE_COLORS[name],
                alpha=0.6,
                lw=0,
                label=f"stage: {name}" if label else None,
            )


def plot_dynamics(
    curves: TrainingCurves, stages: SparsityStages | None, title: str, path: str | Path
) -> Path:
    """LM loss, aux losses, sparsity (overall and per layer, with target and stages) and λ vs step
    - ReMoE Fig. 3's three stages."""
    plt = _plt()
    has_sp = curves.has_sparsity
    n = 4 if has_sp else 2
    fig, axes = plt.subplots(n, 1, figsize=(8, 2.4 * n), sharex=True)
    s = curves.steps
    ax = axes[0]
    ax.plot(s, curves.loss, color="C0", lw=1.2, label="train LM loss")
    if curves.val_loss.size:
        style = "o-" if curves.val_loss.size >= MIN_CURVE_POINTS else "o"
        ax.plot(
            curves.eval_steps,
            curves.val_loss,
            style,
            color="C3",
            ms=3,
            label=f"val loss ({curves.val_loss.size} evaluations)",
        )
    ax.set_ylabel("loss (nats/token)")
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8)
    ax.set_title(title)
    ax = axes[1]
    for i, (name, v) in enumerate(curves.aux.items()):
        ax.plot(s, v, color=f"C{i + 1}", lw=1.2, label=name)
    if curves.aux:
        if all(np.nanmin(v) > 0 for v in curves.aux.values() if np.isfinite(v).any()):
            ax.set_yscale("log")
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8)
    else:
        ax.text(0.5, 0.5, "no aux losses logged", ha="center", va="center", transform=ax.transAxes)
    ax.set_ylabel("aux loss (raw)")
    if has_sp:
        ax = axes[2]
        _shade_stages(ax, s, stages)
        ax.plot(s, curves.sparsity, color="k", lw=1.4, label="overall")
        for i, (lk, v) in enumerate(curves.layer_sparsity.items()):
            ax.plot(s, v, lw=0.7, alpha=0.7, color=f"C{i % 10}", label=f"layer {lk}")
        if stages is not None:
            ax.axhline(stages.target, color="r", ls="--", lw=1, label=f"target {stages.target:.3f}")
            if stages.settle_step is not None:
                ax.axvline(
                    stages.settle_step,
                    color="g",
                    ls=":",
                    lw=1.2,
                    label=f"settled at step {stages.settle_step}: "
                    f"{stages.settled_mean:.4f} (SD over steps {stages.settled_std:.4f})",
                )
        ax.set_ylabel("sparsity (zero router\noutputs, fraction)")
        ax.set_ylim(-0.02, 1.02)
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=7)
        ax = axes[3]
        _shade_stages(ax, s, stages, label=False)
        ax.plot(s, curves.lam, color="C4", lw=1.2, label="λ (L1 coefficient)")
        if np.isfinite(curves.lam).any() and np.nanmin(curves.lam) > 0:
            ax.set_yscale("log")
        ax.set_ylabel("λ (log scale)")
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8)
    axes[-1].set_xlabel("training step")
    return _save(fig, path)


def moving_average(y: np.ndarray, window: int) -> np.ndarray:
    """Trailing mean over the last ``window`` finite points (NaN-aware): a training-loss curve
    logged every few steps is noisy, and the trend is what a comparison reads."""
    y = np.asarray(y, dtype=np.float64)
    out = np.full_like(y, np.nan)
    for i in range(y.size):
        w = y[max(0, i - window + 1) : i + 1]
        w = w[np.isfinite(w)]
        if w.size:
            out[i] = w.mean()
    return out


def _si_axis(ax: Any, axis: str = "x") -> None:
    """Tick labels like ``100k`` / ``1.5M`` and at most six of them, so that long numbers such as
    ``120000`` do not run together on a narrow axis."""
    from matplotlib.ticker import FuncFormatter, MaxNLocator

    target = ax.xaxis if axis == "x" else ax.yaxis
    target.set_major_locator(MaxNLocator(nbins=6, min_n_ticks=3, integer=True))
    target.set_major_formatter(FuncFormatter(lambda v, _pos: _si(v)))


def plot_loss_curves(runs: dict[str, TrainingCurves], path: str | Path, window: int = 5) -> Path:
    """Training LM loss of several runs against tokens seen (thin: logged, thick: moving average
    over ``window`` logged lines), with the validation loss: as a second panel of curves when
    every run was evaluated at least :data:`MIN_CURVE_POINTS` times, otherwise as separate
    points on the training panel."""
    plt = _plt()
    from matplotlib.lines import Line2D

    as_curve = bool(runs) and all(c.val_loss.size >= MIN_CURVE_POINTS for c in runs.values())
    if as_curve:
        fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 3.8))
    else:
        fig, a1 = plt.subplots(1, 1, figsize=(8, 4.2))
        a2 = a1
    n_evals = set()
    for i, (name, c) in enumerate(runs.items()):
        color = f"C{i % 10}"
        x = c.tokens if np.isfinite(c.tokens).any() else c.steps
        a1.plot(x, c.loss, lw=0.7, alpha=0.35, color=color)
        a1.plot(x, moving_average(c.loss, window), lw=1.8, color=color, label=name)
        if c.val_loss.size:
            n_evals.add(int(c.val_loss.size))
            xv = c.eval_tokens if np.isfinite(c.eval_tokens).any() else c.eval_steps
            if as_curve:
                a2.plot(xv, c.val_loss, "o-", ms=3, color=color, label=name)
            else:
                a1.plot(xv, c.val_loss, "o", ms=6, color=color, mec="k", mew=0.8)
    handles, labels = a1.get_legend_handles_labels()
    handles.append(Line2D([], [], color="grey", lw=0.7, alpha=0.5))
    labels.append("logged training loss")
    handles.append(Line2D([], [], color="grey", lw=1.8))
    labels.append(f"moving average ({window} logged lines)")
    if n_evals and not as_curve:
        handles.append(Line2D([], [], ls="", marker="o", color="grey", mec="k"))
        labels.append(
            f"validation loss ({'/'.join(map(str, sorted(n_evals)))} evaluations "
            "per run: too few for a curve)"
        )
    a1.legend(handles, labels, fontsize=7)
    a1.set_title("LM loss" + ("" if as_curve else " (training and validation)"))
    if as_curve:
        a2.set_title("validation loss")
        a2.legend(fontsize=7)
    for ax in {id(a1): a1, id(a2): a2}.values():
        ax.set_xlabel("tokens seen")
        ax.set_ylabel("loss (nats/token)")
        _si_axis(ax)
    fig.tight_layout()
    return _save(fig, path)


def plot_expert_load(load: dict[str, dict], title: str, path: str | Path) -> Path:
    """Heatmap of the share of each layer's assignments per expert (percent), dead experts hatched.

    ``load`` is :func:`moelab.analysis.analyses.expert_load_analysis`'s output."""
    plt = _plt()
    rows = {k: v for k, v in load.items() if v.get("load_fraction") is not None}
    names = list(rows)
    E = max(len(rows[k]["load_fraction"]) for k in names)
    mat = np.full((len(names), E), np.nan)
    for i, k in enumerate(names):
        f = rows[k]["load_fraction"]
        mat[i, : len(f)] = 100.0 * np.asarray(f, dtype=float)
    fig, ax = plt.subplots(figsize=(min(max(7.0, 3 + 0.4 * E), 16), 1.6 + 0.4 * len(names)))
    im = ax.imshow(mat, aspect="auto", cmap="viridis", vmin=0)
    for i, k in enumerate(names):
        thr = 100.0 / (8 * len(rows[k]["load_fraction"]))
        for j in np.nonzero(mat[i] < thr)[0]:
            ax.text(j, i, "×", ha="center", va="center", color="r", fontsize=9)
    labels = [f"layer {k} (dead {100 * (rows[k]['dead_fraction'] or 0):.0f}%)" for k in names]
    ax.set_yticks(range(len(names)), labels)
    ax.set_xlabel("expert")
    if E <= 32:
        ax.set_xticks(range(E))
    ax.set_title(f"{title}\n× = nearly dead expert (< 1/(8E) of the layer's tokens)", fontsize=9)
    fig.colorbar(im, ax=ax, label="share of layer's assignments (%)")
    return _save(fig, path)


def plot_active_by_frequency(compute: dict[str, dict], title: str, path: str | Path) -> Path:
    """Mean active experts per token by training-frequency bin (rare → frequent), per layer, plus
    the per-layer mean - ReMoE Fig. 6."""
    plt = _plt()
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 3.6))
    names = list(compute)
    ticks: list[str] = []
    for i, k in enumerate(names):
        bf = compute[k].get("by_frequency")
        if bf:
            y = [np.nan if v is None else v for v in bf["bin_mean"]]
            a1.plot(range(1, len(y) + 1), y, "o-", ms=3, color=f"C{i % 10}", label=f"layer {k}")
            ticks = [f"{j + 1}\n≤{_si(c)}" for j, c in enumerate(bf["bin_max_count"])]
    if ticks:
        a1.set_xticks(range(1, len(ticks) + 1), ticks)
    a1.set_xlabel("token-frequency bin (rarest → most frequent; ≤ max training count)")
    a1.set_ylabel("active experts per token (mean)")
    a1.set_title("active experts vs token frequency")
    if names:
        a1.legend(fontsize=7, ncol=2)
    means = [np.nan if compute[k]["mean"] is None else compute[k]["mean"] for k in names]
    a2.bar(range(len(names)), means, color="C0")
    a2.set_xticks(range(len(names)), names)
    a2.set_xlabel("layer")
    a2.set_ylabel("active experts per token (mean)")
    a2.set_title("active experts per layer")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return _save(fig, path)


def _si(x: float | None) -> str:
    if x is None or not np.isfinite(x):
        return "–"
    for div, unit in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= div:
            return f"{x / div:.3g}{unit}"
    return f"{x:.0f}"


def plot_domain_shares(domains: dict, title: str, path: str | Path, max_layers: int = 4) -> Path:
    """Routed-token share per expert per domain (percent), one panel per layer (first, middle,
    last) - ReMoE Fig. 7."""
    plt = _plt()
    layers = domains["layers"]
    keys = list(layers)
    if len(keys) > max_layers:
        idx = np.unique(np.linspace(0, len(keys) - 1, max_layers).round().astype(int))
        keys = [keys[i] for i in idx]
    fig, axes = plt.subplots(1, len(keys), figsize=(4.2 * len(keys), 3.2), squeeze=False)
    names = domains["domains"]
    for ax, k in zip(axes[0], keys, strict=True):
        shares = 100 * np.asarray(layers[k]["shares"], dtype=float)
        E = shares.shape[1]
        width = 0.8 / max(len(names), 1)
        for i, d in enumerate(names):
            ax.bar(np.arange(E) + (i - (len(names) - 1) / 2) * width, shares[i], width, label=d)
        ax.axhline(100.0 / E, color="k", ls=":", lw=0.8, label="uniform")
        ax.set_title(f"layer {k} (KL {layers[k]['mean_kl']:.3f} nats)", fontsize=9)
        ax.set_xlabel("expert")
        ax.set_ylabel("share of domain's tokens (%)")
    axes[0][-1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.suptitle(f"{title}: domain specialisation, mean KL {domains['mean_kl']:.3f}", fontsize=10)
    fig.tight_layout()
    return _save(fig, path)


def plot_usage(z_primes: dict[str, np.ndarray], title: str, path: str | Path) -> Path:
    """Sorted gate mass ``z`` per expert (PEER §3.3) on log axes: a flat curve is even usage, and
    the curve's end shows the unused experts."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.5, 3.8))
    for i, (name, z) in enumerate(z_primes.items()):
        z = np.sort(np.asarray(z, dtype=float))[::-1]
        tot = z.sum()
        if tot <= 0:
            continue
        share = z / tot
        ax.plot(
            np.arange(1, z.size + 1),
            np.where(share > 0, share, np.nan),
            color=f"C{i % 10}",
            lw=1,
            label=f"{name} (used {100 * (z > 0).mean():.1f}%)",
        )
        ax.axhline(1 / z.size, color=f"C{i % 10}", ls=":", lw=0.7)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("expert rank (by gate mass)")
    ax.set_ylabel("share of gate mass z")
    ax.set_title(f"{title}: expert usage (dotted: uniform)", fontsize=10)
    ax.legend(fontsize=7)
    return _save(fig, path)


def plot_metric_bars(
    values: dict[str, list[float]], ylabel: str, title: str, path: str | Path
) -> Path:
    """One number per group (e.g. final validation loss per method) over its seeds, twice.

    Left, bars from zero, so their heights compare honestly (an axis starting just below the
    smallest bar turns a 0.02 difference into a visible gap), labelled with mean ± sample SD. Right,
    each group's difference to the lowest mean on an axis centred on zero, so small differences
    are readable and plainly labelled as differences. Seeds are drawn as dots; a group with a
    single seed gets no error bar (it has no spread to show)."""
    plt = _plt()
    names = list(values)
    vals = {n: [float(v) for v in values[n] if v is not None and np.isfinite(v)] for n in names}
    means = {n: float(np.mean(v)) for n, v in vals.items() if v}
    best = min(means.values()) if means else 0.0
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(max(8, 2.2 * len(names) + 3), 3.8))
    for i, n in enumerate(names):
        v = vals[n]
        if not v:
            continue
        color, m = f"C{i % 10}", means[n]
        a1.bar(i, m, color=color, alpha=0.85)
        if len(v) > 1:
            sd = float(np.std(v, ddof=1))  # sample SD over seeds
            a1.errorbar(i, m, yerr=sd, color="k", capsize=4, lw=1.2)
            a2.errorbar(i, m - best, yerr=sd, color=color, capsize=4, lw=1.5, marker="_", ms=14)
            label = f"{m:.3f}\n± {sd:.3f}\n({len(v)} seeds)"
        else:
            a2.plot(i, m - best, marker="_", ms=14, mew=2, color=color)
            label = f"{m:.3f}\n(1 seed)"
        jitter = np.linspace(-0.12, 0.12, len(v)) if len(v) > 1 else np.zeros(1)
        a2.plot(i + jitter, np.asarray(v) - best, "o", ms=3.5, color=color, mec="k", mew=0.5)
        a1.text(
            i,
            m * 0.5,
            label,
            ha="center",
            va="center",
            fontsize=8,
            color="white",
            fontweight="bold",
        )
    for ax in (a1, a2):
        ax.set_xticks(range(len(names)), names, rotation=20, ha="right")
        ax.set_xlim(-0.6, len(names) - 0.4)
    a1.set_ylabel(ylabel)
    a1.set_ylim(bottom=0)
    a1.set_title("mean over seeds (bars from zero)", fontsize=9)
    a2.axhline(0, color="k", lw=0.8)
    a2.set_ylabel("difference to the lowest mean")
    a2.set_title("difference to the lowest mean (dots: seeds; bars: ± sample SD)", fontsize=9)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return _save(fig, path)
