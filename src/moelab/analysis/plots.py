"""PNG plots of the analyses (matplotlib, Agg backend, imported lazily).

matplotlib is the optional ``analysis`` extra: every statistic works without it, and only these
functions raise a clear error when it is missing. Each function writes one PNG and returns its path.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from moelab.analysis.runs import TrainingCurves
from moelab.analysis.stats import SparsityStages

STAGE_COLORS = {"dense": "#f4cccc", "sparsifying": "#fff2cc", "stable": "#d9ead3"}


def _plt() -> Any:
    try:
        import matplotlib
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError(
            "plots need matplotlib: pip install 'moelab[analysis]' (statistics work without it)"
        ) from err
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    _plt().close(fig)
    return path


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
            ax.axvspan(a, b, color=STAGE_COLORS[name], alpha=0.6, lw=0,
                       label=f"stage: {name}" if label else None)


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
        ax.plot(curves.eval_steps, curves.val_loss, "o-", color="C3", ms=3, label="val loss")
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
                ax.axvline(stages.settle_step, color="g", ls=":", lw=1.2,
                           label=f"settled at step {stages.settle_step}: "
                           f"{stages.settled_mean:.4f} ± {stages.settled_std:.4f}")
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


def plot_loss_curves(runs: dict[str, TrainingCurves], path: str | Path) -> Path:
    """Train LM loss and validation loss of several runs against tokens seen."""
    plt = _plt()
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 3.8))
    for i, (name, c) in enumerate(runs.items()):
        x = c.tokens if np.isfinite(c.tokens).any() else c.steps
        a1.plot(x, c.loss, lw=1, color=f"C{i % 10}", label=name)
        if c.val_loss.size:
            xv = c.eval_tokens if np.isfinite(c.eval_tokens).any() else c.eval_steps
            a2.plot(xv, c.val_loss, "o-", ms=3, color=f"C{i % 10}", label=name)
    a1.set_title("training LM loss")
    a2.set_title("validation loss")
    for ax in (a1, a2):
        ax.set_xlabel("tokens seen")
        ax.set_ylabel("loss (nats/token)")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
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
        ax.plot(np.arange(1, z.size + 1), np.where(share > 0, share, np.nan), color=f"C{i % 10}",
                lw=1, label=f"{name} (used {100 * (z > 0).mean():.1f}%)")
        ax.axhline(1 / z.size, color=f"C{i % 10}", ls=":", lw=0.7)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("expert rank (by gate mass)")
    ax.set_ylabel("share of gate mass z")
    ax.set_title(f"{title}: expert usage (dotted: uniform)", fontsize=10)
    ax.legend(fontsize=7)
    return _save(fig, path)


def plot_metric_bars(
    values: dict[str, tuple[float, float]], ylabel: str, title: str, path: str | Path
) -> Path:
    """Bar chart of mean ± std per group (seeds), e.g. final validation loss per method."""
    plt = _plt()
    names = list(values)
    means = [values[n][0] for n in names]
    stds = [0.0 if not np.isfinite(values[n][1]) else values[n][1] for n in names]
    fig, ax = plt.subplots(figsize=(max(4, 1.1 * len(names) + 2), 3.5))
    colors = [f"C{i % 10}" for i in range(len(names))]
    ax.bar(range(len(names)), means, yerr=stds, capsize=4, color=colors)
    ax.set_xticks(range(len(names)), names, rotation=20, ha="right")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    finite = [m for m in means if np.isfinite(m)]
    if finite:
        lo, hi = min(finite), max(finite)
        pad = max(0.05 * (hi - lo), 0.02 * abs(hi) + 1e-6, max(stds) * 1.5)
        ax.set_ylim(lo - pad * 3, hi + pad * 3)
    return _save(fig, path)
