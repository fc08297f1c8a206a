"""The report's comparison plots do not mislead (issue #9, item 14): readable tick labels, bars
from zero, no error bars for single seeds, no two-point "curves"."""

from __future__ import annotations

import numpy as np
import pytest
from analysis_fixtures import write_run

from moelab.analysis import figures as figure_files
from moelab.analysis import plots, read_run, training_curves

pytest.importorskip("matplotlib")


@pytest.fixture
def figures(monkeypatch):
    """The figures the plot functions save, kept open for inspection."""
    saved = []

    def keep(fig, path):
        fig.canvas.draw()
        saved.append(fig)
        fig.savefig(path)
        return path

    monkeypatch.setattr(plots, "_save", keep)
    return saved


def _overlaps(boxes) -> bool:
    boxes = sorted(boxes, key=lambda b: b.x0)
    return any(a.x1 > b.x0 for a, b in zip(boxes, boxes[1:], strict=False))


def _paper_mini_like(tmp_path):
    """250 steps of 1,024 tokens, evaluated at steps 100, 200 and 250 (the presets' defaults)."""
    return {
        g: training_curves(
            read_run(write_run(tmp_path, g, g, steps=250, eval_every=100, val_loss=v, layers=0))
        )
        for g, v in (("dense", 6.2), ("topk", 6.3), ("remoe", 5.9))
    }


def test_loss_curve_tick_labels_do_not_run_together(tmp_path, figures):
    plots.plot_loss_curves(_paper_mini_like(tmp_path), tmp_path / "l.png")
    fig = figures[-1]
    renderer = fig.canvas.get_renderer()
    for ax in fig.axes:
        labels = [t for t in ax.get_xticklabels() if t.get_text()]
        assert len(labels) >= 3
        assert not _overlaps([t.get_window_extent(renderer) for t in labels]), [
            t.get_text() for t in labels
        ]
        assert all(len(t.get_text()) <= 5 for t in labels)  # "100k", not "100000"


def test_few_evaluations_are_points_not_a_curve(tmp_path, figures):
    curves = _paper_mini_like(tmp_path)
    assert all(c.val_loss.size == 3 for c in curves.values())
    plots.plot_loss_curves(curves, tmp_path / "l.png")
    fig = figures[-1]
    for ax in fig.axes:
        for line in ax.get_lines():
            x = line.get_xdata()
            if len(x) == 3:  # a validation series: markers only, no connecting line
                assert line.get_linestyle() in ("None", "", " ") and line.get_marker() == "o"
    texts = " ".join(t.get_text() for ax in fig.axes for t in ax.get_legend().get_texts())
    assert "too few for a curve" in texts and "moving average" in texts


def test_many_evaluations_still_get_a_validation_curve(tmp_path, figures):
    curves = {
        "a": training_curves(read_run(write_run(tmp_path, "a", "dense", layers=0, eval_every=20)))
    }
    plots.plot_loss_curves(curves, tmp_path / "l.png")
    fig = figures[-1]
    assert len(fig.axes) == 2 and fig.axes[1].get_title() == "validation loss"
    assert fig.axes[1].get_lines()[0].get_linestyle() == "-"


def test_bars_start_at_zero_and_single_seeds_have_no_error_bar(tmp_path, figures):
    plots.plot_metric_bars(
        {"dense": [6.229], "topk": [6.30, 6.32, 6.35], "remoe": [5.926]},
        "validation loss",
        "final validation loss",
        tmp_path / "b.png",
    )
    fig = figures[-1]
    bars_ax = fig.axes[0]
    assert bars_ax.get_ylim()[0] == 0.0
    # error bars: only the 3-seed group has one (matplotlib draws them as LineCollections)
    from matplotlib.collections import LineCollection

    err = [c for c in bars_ax.collections if isinstance(c, LineCollection)]
    assert len(err) == 1
    seg = err[0].get_segments()[0]
    assert np.isclose(seg[:, 0], 1).all()  # at the topk bar (x = 1)
    texts = [t.get_text() for t in bars_ax.texts]
    assert "6.229\n(1 seed)" in texts and any("± 0.025" in t for t in texts)  # ddof=1


def test_saved_plots_are_small_palette_pngs_close_to_the_full_colour_render(tmp_path):
    """compact_png: a third of the size or less, and pixel for pixel close to the RGB render (a
    heatmap's colormap and anti-aliased lines survive the 64-colour palette)."""
    import io

    Image = pytest.importorskip("PIL.Image")
    plt = figure_files.pyplot()
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(8, 3))
    x = np.linspace(0, 10, 300)
    for i in range(6):
        a1.plot(x, np.sin(x + i), label=f"run {i}")
    a1.legend(fontsize=8)
    a2.imshow(np.random.default_rng(0).random((4, 16)), cmap="viridis")
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=figure_files.DPI, facecolor="white")
    plt.close(fig)
    raw = buf.getvalue()
    small = figure_files.compact_png(raw)
    assert len(small) < len(raw) / 3
    a = np.asarray(Image.open(io.BytesIO(raw)).convert("RGB"), dtype=np.float64)
    b = np.asarray(Image.open(io.BytesIO(small)).convert("RGB"), dtype=np.float64)
    assert a.shape == b.shape
    assert np.abs(a - b).mean() < 2.0 and np.percentile(np.abs(a - b), 99) < 40
