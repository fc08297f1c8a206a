"""Saving the report's matplotlib figures: the lazy import (matplotlib is the optional
``analysis`` extra), one resolution and a palette re-encoding for every PNG.

Apart from :mod:`moelab.analysis.plots` (what each plot draws) because this is what decides a
plot's weight in the self-contained HTML report and in docs/results.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

# Resolution and palette of every saved plot: 80 dpi keeps the 8-point legend text legible, and a
# 64-colour palette holds a plot's flat colours and their anti-aliased edges (see compact_png).
DPI = 80
PALETTE_COLORS = 64


def pyplot() -> Any:
    """``matplotlib.pyplot`` on the Agg backend; ImportError saying how to install it."""
    try:
        import matplotlib
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError(
            "plots need matplotlib: pip install 'moelab[analysis]' (statistics work without it)"
        ) from err
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def save_png(fig: Any, path: str | Path) -> Path:
    """Write ``fig`` to ``path`` at :data:`DPI` through :func:`compact_png`; close it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, bbox_inches="tight", facecolor="white")
    pyplot().close(fig)
    path.write_bytes(compact_png(buf.getvalue()))
    return path


def compact_png(data: bytes, colors: int = PALETTE_COLORS) -> bytes:
    """``data`` (a PNG) with a ``colors``-colour palette, no dithering: a plot's flat colours and
    anti-aliased edges stay readable at a third of the bytes (the HTML report embeds every plot,
    docs/results commits them). Octree, unlike median cut, keeps small patches of distinct colour
    (legend keys, thin lines) apart. Pillow comes with matplotlib."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        pal = im.convert("RGB").quantize(
            colors, Image.Quantize.FASTOCTREE, dither=Image.Dither.NONE
        )
    out = io.BytesIO()
    pal.save(out, format="PNG", optimize=True)
    return out.getvalue()
