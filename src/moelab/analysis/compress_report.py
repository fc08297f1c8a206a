"""The compress suite's report: one table row per (source, method, setting) and two plots of
whole-split validation loss against what a compressed run keeps (MoE parameters, weight bytes).

Kept apart from the runner (:mod:`moelab.compress.suite`) so that a report can be
redrawn from the ``rows/*.json`` files alone (no checkpoint, no evaluation).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from moelab.analysis.figures import pyplot, save_png

__all__ = ["REPORT_FILE", "read_rows", "table_markdown", "write_compress_report"]

REPORT_FILE = "compress_report.md"
_SETTING_ORDER = {"source": -1}


def read_rows(out_dir: str | Path) -> list[dict[str, Any]]:
    """The rows a suite directory holds (``rows/*.json``)."""
    return [json.loads(p.read_text("utf-8")) for p in sorted(Path(out_dir, "rows").glob("*.json"))]


def _sources(rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {r["source"]: r for r in rows if r["method"] == "none"}


def _fmt(value: Any, spec: str) -> str:
    return (
        "—"
        if value is None or (isinstance(value, float) and not math.isfinite(value))
        else format(value, spec)
    )


def table_markdown(rows: list[dict[str, Any]]) -> str:
    """The table: source, method, setting, MoE parameters kept, weights-file bytes, whole-split
    validation loss and its difference to the uncompressed source (a refusal: its reason)."""
    src = _sources(rows)
    healed = any("healed_val_loss" in r for r in rows)
    head = [
        "source",
        "method",
        "setting",
        "MoE params kept",
        "weights bytes",
        "val loss",
        "Δ vs source",
    ]
    head += ["healed val loss", "healed Δ"] if healed else []
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in sorted(rows, key=lambda r: (r["source"], r["method"] != "none", r["method"])):
        base = src.get(r["source"], {}).get("val_loss")
        if r["status"] != "ok":
            cells = [
                r["source"],
                r["method"],
                r["setting"],
                "refused: " + r["reason"].replace("|", "/"),
            ]
            lines.append("| " + " | ".join(cells) + " |" + " |" * (len(head) - len(cells)))
            continue
        delta = r["val_loss"] - base if base is not None else None
        cells = [
            r["source"],
            r["method"],
            r["setting"],
            _fmt(r.get("kept"), ".3f"),
            f"{r['weights_bytes']:,}",
            _fmt(r["val_loss"], ".4f"),
            "—" if r["method"] == "none" else _fmt(delta, "+.4f"),
        ]
        if healed:
            h = r.get("healed_val_loss")
            cells += [
                _fmt(h, ".4f") if h is not None else r.get("heal_refused", "—")[:60],
                _fmt(h - base if h is not None and base is not None else None, "+.4f"),
            ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _plot(rows: list[dict[str, Any]], key: str, xlabel: str, path: Path) -> Path:
    """One panel per source: each method's settings as a line of points, the source as a star."""
    plt = pyplot()
    src = _sources(rows)
    fig, axes = plt.subplots(
        1, max(1, len(src)), figsize=(5.2 * max(1, len(src)), 4), squeeze=False
    )
    methods = sorted({r["method"] for r in rows if r["method"] != "none"})
    for ax, (label, base) in zip(axes[0], src.items(), strict=False):
        for i, m in enumerate(methods):
            pts = sorted(
                (r[key], r["val_loss"])
                for r in rows
                if r["source"] == label
                and r["method"] == m
                and r["status"] == "ok"
                and r.get(key) is not None
                and math.isfinite(r["val_loss"])
            )
            if pts:
                xs, ys = zip(*pts, strict=True)
                ax.plot(xs, ys, "o-", color=f"C{i % 10}", label=m, ms=4, lw=1.2)
        ax.plot([base[key]], [base["val_loss"]], "*", color="k", ms=12, label="uncompressed")
        ax.set_title(label, fontsize=10)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("validation loss, whole split (nats/token)")
        ax.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=7, loc="best")
    fig.tight_layout()
    return save_png(fig, path)


def write_compress_report(rows: list[dict[str, Any]], out_dir: str | Path) -> dict[str, Any]:
    """Write ``compress_report.md`` and the plots ``img/compress_loss_vs_params.png``,
    ``img/compress_loss_vs_bytes.png`` into ``out_dir``."""
    out = Path(out_dir)
    images = []
    if _sources(rows):
        images = [
            _plot(
                rows,
                "kept",
                "fraction of MoE-layer parameters kept",
                out / "img" / "compress_loss_vs_params.png",
            ),
            _plot(
                rows,
                "weights_bytes",
                "weights file (bytes)",
                out / "img" / "compress_loss_vs_bytes.png",
            ),
        ]
    refused = sum(r["status"] != "ok" for r in rows)
    text = [
        "# Compression suite",
        "",
        "Each source run compressed by every registered method (`moelab compress`) at the "
        "settings the method declares, evaluated on the whole validation split. 'MoE params "
        "kept' is the compressed MoE layers' parameters over the source's (nonzero ones for "
        "stun; quantize keeps every parameter in fewer bits, so it shows 1 and its saving is "
        "in the bytes). Δ is against the uncompressed source, evaluated the same way.",
        "",
        table_markdown(rows),
        "",
        f"{len(rows)} rows, {refused} refused.",
        "",
        *[f"![{p.stem}](img/{p.name})" for p in images],
        "",
    ]
    md = out / REPORT_FILE
    md.write_text("\n".join(text), "utf-8")
    return {"markdown": md, "images": images}
