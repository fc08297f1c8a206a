"""Rendering a report's sections twice, as Markdown (images linked) and as self-contained HTML
(images embedded), so that both always say the same thing."""

from __future__ import annotations

import base64
import html
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class Section:
    """One titled part of a report: paragraphs, an optional table, images (PNG files)."""

    title: str
    text: str = ""
    table: list[list[str]] | None = None  # first row is the header
    images: list[Path] = field(default_factory=list)


def _md_table(rows: list[list[str]]) -> str:
    esc = [[c.replace("|", "\\|") for c in r] for r in rows]
    lines = ["| " + " | ".join(esc[0]) + " |", "|" + "---|" * len(esc[0])]
    lines += ["| " + " | ".join(r) + " |" for r in esc[1:]]
    return "\n".join(lines)


def _html_table(rows: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in rows[0])
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in rows[1:]
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


CSS = (
    "body{font-family:system-ui,sans-serif;max-width:1200px;margin:2em auto;padding:0 1em;"
    "color:#222}table{border-collapse:collapse;margin:1em 0;font-size:0.9em}"
    "th,td{border:1px solid #ccc;padding:4px 8px;text-align:right}th{background:#f3f3f3}"
    "td:first-child,th:first-child{text-align:left}img{max-width:100%;display:block;"
    "margin:0.5em 0 1.5em}pre{white-space:pre-wrap;background:#f8f8f8;padding:0.5em}"
)


def render(title: str, sections: list[Section], out_dir: Path) -> tuple[Path, Path]:
    """Write ``report.md`` (images linked) and ``report.html`` (images embedded as base64)."""
    md = [f"# {title}", ""]
    body = [f"<h1>{html.escape(title)}</h1>"]
    for s in sections:
        md += [f"## {s.title}", ""]
        body.append(f"<h2>{html.escape(s.title)}</h2>")
        if s.text:
            md += [s.text, ""]
            for para in s.text.split("\n\n"):
                body.append(f"<p>{html.escape(para)}</p>")
        if s.table:
            md += [_md_table(s.table), ""]
            body.append(_html_table(s.table))
        for img in s.images:
            rel = img.relative_to(out_dir).as_posix()
            md += [f"![{img.stem}]({rel})", ""]
            data = base64.b64encode(img.read_bytes()).decode("ascii")
            body.append(
                f'<figure><img alt="{html.escape(img.stem)}" src="data:image/png;base64,{data}">'
                f"<figcaption>{html.escape(img.stem)}</figcaption></figure>"
            )
    md_path, html_path = out_dir / "report.md", out_dir / "report.html"
    md_path.write_text("\n".join(md), "utf-8")
    html_path.write_text(
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        f"<title>{html.escape(title)}</title><style>{CSS}</style></head><body>"
        + "\n".join(body)
        + "</body></html>\n",
        "utf-8",
    )
    return md_path, html_path
