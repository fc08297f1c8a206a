"""Rendering a report's sections twice, as Markdown (images linked) and as self-contained HTML
(images embedded), so that both always say the same thing.

Table cells are plain strings, so tables are easy to build and to test; two small additions say
what a plain string cannot: a :class:`Link` cell (a string that also carries a target, so a number
can point at the file line it came from) and a section's ``highlight`` set (cells that differ
between runs, shown in bold / shaded, so a reader sees at once what a comparison varies).
"""

from __future__ import annotations

import base64
import html as _html
from dataclasses import dataclass, field
from pathlib import Path


class Link(str):
    """A table cell that links somewhere: ``Link("5.93", "runs/a/metrics.jsonl#L31")``. It is a
    ``str`` (its text), so code that only reads cells keeps working."""

    href: str

    def __new__(cls, text: str, href: str) -> Link:
        obj = super().__new__(cls, text)
        obj.href = href
        return obj


@dataclass
class Section:
    """One titled part of a report: warnings, paragraphs, an optional table, images (PNG files).

    ``highlight`` holds ``(row, column)`` cells of ``table`` (row 0 is the header) to mark as
    differing between runs; ``warnings`` are shown first and prominently."""

    title: str
    text: str = ""
    table: list[list[str]] | None = None  # first row is the header
    images: list[Path] = field(default_factory=list)
    highlight: set[tuple[int, int]] = field(default_factory=set)
    warnings: list[str] = field(default_factory=list)


def _md_cell(c: str, marked: bool) -> str:
    text = str.__str__(c).replace("|", "\\|")
    if isinstance(c, Link):
        text = f"[{text}]({c.href})"
    return f"**{text}**" if marked and text.strip() else text


def _md_table(rows: list[list[str]], highlight: set[tuple[int, int]] = frozenset()) -> str:
    esc = [[_md_cell(c, (i, j) in highlight) for j, c in enumerate(r)] for i, r in enumerate(rows)]
    lines = ["| " + " | ".join(esc[0]) + " |", "|" + "---|" * len(esc[0])]
    lines += ["| " + " | ".join(r) + " |" for r in esc[1:]]
    return "\n".join(lines)


def _html_cell(c: str, tag: str, marked: bool) -> str:
    text = _html.escape(str.__str__(c))
    if isinstance(c, Link):
        text = f'<a href="{_html.escape(c.href)}">{text}</a>'
    cls = ' class="diff"' if marked else ""
    return f"<{tag}{cls}>{text}</{tag}>"


def _html_table(rows: list[list[str]], highlight: set[tuple[int, int]] = frozenset()) -> str:
    head = "".join(_html_cell(c, "th", (0, j) in highlight) for j, c in enumerate(rows[0]))
    body = "".join(
        "<tr>"
        + "".join(_html_cell(c, "td", (i, j) in highlight) for j, c in enumerate(r))
        + "</tr>"
        for i, r in enumerate(rows[1:], 1)
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


CSS = (
    "body{font-family:system-ui,sans-serif;max-width:1200px;margin:2em auto;padding:0 1em;"
    "color:#222}table{border-collapse:collapse;margin:1em 0;font-size:0.9em}"
    "th,td{border:1px solid #ccc;padding:4px 8px;text-align:right}th{background:#f3f3f3}"
    "td:first-child,th:first-child{text-align:left}td.diff{background:#fff2cc;font-weight:bold}"
    ".warning{background:#fde2e1;border-left:6px solid #c0392b;padding:0.5em 1em;margin:0.5em 0}"
    "img{max-width:100%;display:block;"
    "margin:0.5em 0 1.5em}pre{white-space:pre-wrap;background:#f8f8f8;padding:0.5em}"
)


def render(
    title: str, sections: list[Section], out_dir: Path, *, html: bool = True
) -> tuple[Path, Path | None]:
    """Write ``report.md`` (images linked) and, with ``html``, ``report.html`` (images embedded
    as base64, one file to send or open anywhere). Returns both paths (``None`` for no HTML).

    The Markdown report is what docs/results commits: it links the plots committed beside it,
    where the HTML would hold a second, base64 copy of every plot."""
    md = [f"# {title}", ""]
    body = [f"<h1>{_html.escape(title)}</h1>"]
    for s in sections:
        md += [f"## {s.title}", ""]
        body.append(f"<h2>{_html.escape(s.title)}</h2>")
        for w in s.warnings:
            md += [f"> **Warning:** {w}", ""]
            body.append(f'<div class="warning"><strong>Warning:</strong> {_html.escape(w)}</div>')
        if s.text:
            md += [s.text, ""]
            for para in s.text.split("\n\n"):
                body.append(f"<p>{_html.escape(para)}</p>")
        if s.table:
            md += [_md_table(s.table, s.highlight), ""]
            body.append(_html_table(s.table, s.highlight))
        for img in s.images:
            rel = img.relative_to(out_dir).as_posix()
            md += [f"![{img.stem}]({rel})", ""]
            if html:
                data = base64.b64encode(img.read_bytes()).decode("ascii")
                body.append(
                    f'<figure><img alt="{_html.escape(img.stem)}" '
                    f'src="data:image/png;base64,{data}">'
                    f"<figcaption>{_html.escape(img.stem)}</figcaption></figure>"
                )
    md_path, html_path = out_dir / "report.md", out_dir / "report.html"
    md_path.write_text("\n".join(md), "utf-8")
    if not html:
        return md_path, None
    html_path.write_text(
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>{_html.escape(title)}</title><style>{CSS}</style></head><body>"
        + "\n".join(body)
        + "</body></html>\n",
        "utf-8",
    )
    return md_path, html_path
