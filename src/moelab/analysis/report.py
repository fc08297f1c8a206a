"""Side-by-side experiment reports: ``report.md`` + self-contained ``report.html`` + PNG plots.

A report is built as a list of sections (text, tables, images) and rendered twice, so Markdown and
HTML always say the same thing. Runs sharing a name up to a ``-seedN`` suffix (or grouped
explicitly) are averaged: numbers are shown as mean ± std over seeds.
"""

from __future__ import annotations

import base64
import html
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from moelab.analysis import analyses, plots
from moelab.analysis.evalpass import (
    EvalSettings,
    check_same_vocab,
    list_checkpoints,
    load_model,
    model_vocab_size,
    run_eval_pass,
    tokenizer_id,
    train_token_counts,
)
from moelab.analysis.runs import RunRecord, read_run, sparsity_target, training_curves
from moelab.analysis.stats import mean_std


@dataclass
class Section:
    title: str
    text: str = ""
    table: list[list[str]] | None = None  # first row is the header
    images: list[Path] = field(default_factory=list)


@dataclass
class RunAnalysis:
    """Everything computed for one run (JSON-able ``results``, plus a note on what was skipped)."""

    record: RunRecord
    results: dict[str, Any]
    notes: list[str] = field(default_factory=list)
    z_primes: dict[str, np.ndarray] = field(default_factory=dict)


# ----------------------------------------------------------------------------- per run


def analyze_run(
    run_dir: str | Path,
    what: tuple[str, ...] | list[str] = analyses.ANALYSES,
    settings: EvalSettings | None = None,
    checkpoint: str | None = None,
    compare_checkpoint: str | None = None,
    tolerance: float = 0.03,
) -> RunAnalysis:
    """Run the requested analyses on one run directory.

    ``dynamics`` reads only ``metrics.jsonl``; the others run one evaluation pass with the trained
    model (:func:`moelab.analysis.evalpass.run_eval_pass`). ``stability`` compares
    ``compare_checkpoint`` (default: the previous checkpoint) with ``checkpoint`` (default: latest)
    and is skipped with a note when the run has a single checkpoint.
    """
    rec = read_run(run_dir)
    unknown = sorted(set(what) - set(analyses.ANALYSES))
    if unknown:
        raise ValueError(f"unknown analyses {unknown}; choose from {list(analyses.ANALYSES)}")
    settings = settings or EvalSettings()
    out = RunAnalysis(rec, {})
    curves = training_curves(rec)
    if "dynamics" in what:
        out.results["dynamics"] = analyses.dynamics(curves, sparsity_target(rec), tolerance)
    if curves.last_tokens_per_expert:
        out.results["train_load"] = analyses.training_load(curves.last_tokens_per_expert)
    per_token = [w for w in what if w != "dynamics"]
    if not per_token:
        return out
    model, run_config = load_model(rec.path, checkpoint)
    trace, ds = run_eval_pass(model, run_config, settings, rec.path)
    out.results["vocab_size"] = model_vocab_size(model)
    out.results["tokenizer"] = tokenizer_id(rec.path, ds)
    out.results["eval_tokens"] = trace.num_tokens
    out.results["eval_loss_by_domain"] = analyses.loss_by_domain(trace)
    out.results["eval_loss"] = float(trace.loss_T.mean()) if trace.num_tokens else None
    if not trace.layers:
        out.notes.append("no routed layers: routing analyses do not apply")
        return out
    if "load" in what:
        out.results["load"] = analyses.expert_load_analysis(trace)
    if "compute" in what:
        out.results["compute"] = analyses.dynamic_compute(trace, train_token_counts(ds))
    if "domains" in what:
        out.results["domains"] = analyses.domain_analysis(trace)
    if "usage" in what:
        out.results["usage"] = analyses.usage_analysis(trace)
        out.z_primes = {k: lt.z_prime_E for k, lt in trace.layers.items()}
    if "top-tokens" in what:
        tok = _run_tokenizer(rec.path, ds)
        out.results["top_tokens"] = analyses.top_tokens(trace, decode=tok.decode)
    if "stability" in what:
        ckpts = list_checkpoints(rec.path)
        if compare_checkpoint is None and len(ckpts) < 2:
            out.notes.append("stability: needs two checkpoints; this run has one")
        else:
            other = compare_checkpoint or str(ckpts[-2])
            model_b, cfg_b = load_model(rec.path, other)
            trace_b, _ = run_eval_pass(model_b, cfg_b, settings, rec.path)
            res = analyses.stability(trace_b, trace)
            res["checkpoints"] = [str(other), str(checkpoint or ckpts[-1])]
            out.results["stability"] = res
    return out


def _run_tokenizer(run_dir: Path, ds: Any) -> Any:
    own = run_dir / "tokenizer.json"
    if own.is_file():
        from moelab.data import load_tokenizer

        return load_tokenizer(own)
    return ds.tokenizer()


# ----------------------------------------------------------------------------- formatting


def _fmt(x: Any, digits: int = 3) -> str:
    if x is None:
        return "–"
    if isinstance(x, float) and not math.isfinite(x):
        return "–"
    if isinstance(x, int | np.integer) or (isinstance(x, float) and x.is_integer() and x > 1e3):
        return _si(float(x))
    return f"{x:.{digits}f}"


def _si(x: float) -> str:
    for div, unit in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= div:
            return f"{x / div:.3g}{unit}"
    return f"{x:.0f}"


def _pm(values: list[Any], digits: int = 3, si: bool = False) -> str:
    v = [float(x) for x in values if x is not None]
    m, s = mean_std(v)
    if not math.isfinite(m):
        return "–"
    f = _si if si else (lambda x: f"{x:.{digits}f}")
    if len(v) == 1 or s == 0:
        return f(m)
    return f"{f(m)} ± {f(s)}"


def group_runs(records: list[RunRecord], groups: dict[str, list[str]] | None) -> dict[str, list]:
    """``group name → records``; explicit ``groups`` map names to run directories, otherwise runs
    are grouped by their name without a ``-seedN`` suffix. Order follows first appearance."""
    if groups:
        by_path = {str(r.path.resolve()): r for r in records}
        return {
            g: [by_path[str(Path(p).expanduser().resolve())] for p in dirs]
            for g, dirs in groups.items()
        }
    out: dict[str, list[RunRecord]] = {}
    for r in records:
        out.setdefault(r.group, []).append(r)
    return out


def runs_table(grouped: dict[str, list[RunRecord]]) -> list[list[str]]:
    """The main table: method, params, FLOPs/token, tokens, final val loss/ppl (overall and per
    domain) and throughput, mean ± std over each group's seeds."""
    domains: list[str] = []
    for recs in grouped.values():
        for r in recs:
            for d in r.final_val()["val_loss_by_domain"]:
                if d not in domains:
                    domains.append(d)
    header = ["run", "method", "seeds", "active params", "total params", "FLOPs/token", "tokens",
              "val loss", "val ppl", *[f"loss: {d}" for d in domains], "tokens/s"]
    rows = [header]
    for g, recs in grouped.items():
        p = [r.summary.get("params") or {} for r in recs]
        fv = [r.final_val() for r in recs]
        methods = sorted({r.method for r in recs})
        rows.append([
            g,
            "/".join(methods),
            str(len(recs)),
            _pm([x.get("active_params") for x in p], si=True),
            _pm([x.get("total_params") for x in p], si=True),
            _pm([x.get("flops_per_token") for x in p], si=True),
            _pm([r.summary.get("tokens") or (r.train[-1].get("tokens") if r.train else None)
                 for r in recs], si=True),
            _pm([f["val_loss"] for f in fv], 4),
            _pm([f["val_ppl"] for f in fv], 2),
            *[_pm([f["val_loss_by_domain"].get(d) for f in fv], 4) for d in domains],
            _pm([r.summary.get("tokens_per_s") for r in recs], si=True),
        ])
    return rows


def analysis_table(grouped: dict[str, list[RunAnalysis]]) -> list[list[str]]:
    """Per group, mean ± std over seeds of the headline routing numbers."""
    header = ["run", "settle step", "sparsity after settling (target)", "dead experts",
              "active experts/token", "rare − frequent active", "domain KL (nats)", "usage",
              "unevenness", "flip rate"]
    rows = [header]
    for g, ras in grouped.items():
        def col(fn: Any, ras: list[RunAnalysis] = ras) -> list[Any]:
            vals = []
            for ra in ras:
                try:
                    vals.append(fn(ra.results))
                except (KeyError, TypeError, ValueError, ZeroDivisionError):
                    vals.append(None)
            return vals

        def layer_mean(res: dict, key: str, field_: str) -> float | None:
            v = [x.get(field_) for x in res[key].values() if x.get(field_) is not None]
            return float(np.mean(v)) if v else None

        def rare(res: dict) -> float | None:
            v = [x["by_frequency"]["rare_minus_frequent"] for x in res["compute"].values()
                 if x.get("by_frequency") and x["by_frequency"]["rare_minus_frequent"] is not None]
            return float(np.mean(v)) if v else None

        targets = col(lambda r: r["dynamics"]["stages"]["target"])
        target = next((t for t in targets if t is not None), None)
        settled_means = col(lambda r: r["dynamics"]["stages"]["settled_mean"])
        settled = _pm(settled_means, 4)
        if len(ras) == 1 and settled_means[0] is not None:  # one seed: the std over steps
            settled += f" ± {ras[0].results['dynamics']['stages']['settled_std']:.4f}"
        if target is not None:
            settled += f" ({target:.3f})"
        rows.append([
            g,
            _pm(col(lambda r: r["dynamics"]["stages"]["settle_step"]), 0),
            settled,
            _pm(col(lambda r: layer_mean(r, "load" if "load" in r else "train_load",
                                         "dead_fraction")), 3),
            _pm(col(lambda r: layer_mean(r, "compute", "mean")), 3),
            _pm(col(rare), 3),
            _pm(col(lambda r: r["domains"]["mean_kl"]), 4),
            _pm(col(lambda r: layer_mean(r, "usage", "usage")), 3),
            _pm(col(lambda r: layer_mean(r, "usage", "unevenness")), 3),
            _pm(col(lambda r: r["stability"]["mean_token_flip_rate"]), 3),
        ])
    return rows


def eval_loss_table(grouped: dict[str, list[RunAnalysis]]) -> list[list[str]] | None:
    """Per group, the analysis pass's loss per domain (mean ± std over seeds); None if no run
    had an analysis pass."""
    domains: list[str] = []
    for ras in grouped.values():
        for ra in ras:
            for d in ra.results.get("eval_loss_by_domain", {}):
                if d not in domains:
                    domains.append(d)
    if not domains:
        return None
    rows = [["run", "tokens", "all", *domains]]
    for g, ras in grouped.items():
        with_pass = [ra for ra in ras if "eval_loss_by_domain" in ra.results]
        if not with_pass:
            continue
        rows.append([
            g,
            _pm([ra.results["eval_tokens"] for ra in with_pass], si=True),
            _pm([ra.results.get("eval_loss") for ra in with_pass], 4),
            *[_pm([ra.results["eval_loss_by_domain"].get(d) for ra in with_pass], 4)
              for d in domains],
        ])
    return rows


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


# ----------------------------------------------------------------------------- report


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)


def build_report(
    run_dirs: list[str | Path],
    out_dir: str | Path,
    *,
    groups: dict[str, list[str]] | None = None,
    analyze: bool = True,
    settings: EvalSettings | None = None,
    title: str = "moelab experiment report",
    plots_enabled: bool = True,
) -> dict[str, Any]:
    """Write ``out_dir/report.md``, ``out_dir/report.html`` and the PNGs for ``run_dirs``.

    Every directory must be a run (ValueError naming it otherwise). With ``analyze``, each run
    with a checkpoint gets one evaluation pass for the per-token analyses; all analysed runs must
    share a vocabulary (ValueError naming the odd one). Runs with no routed layers or no
    checkpoint still get their row in the loss table. Returns paths and the per-run results (also
    written to ``out_dir/analysis.json``).
    """
    if not run_dirs:
        raise ValueError("report: give at least one run directory")
    out = Path(out_dir).expanduser()
    records = [read_run(d) for d in run_dirs]
    out.mkdir(parents=True, exist_ok=True)
    img_dir = out / "plots"
    grouped = group_runs(records, groups)
    settings = settings or EvalSettings()
    t0 = time.time()

    results: dict[str, RunAnalysis] = {}
    vocab_entries: list[tuple[str, int, str]] = []
    for rec in records:
        can_eval = analyze and bool(list_checkpoints(rec.path))
        what = analyses.ANALYSES if can_eval else ("dynamics",)
        ra = analyze_run(rec.path, what, settings)
        if analyze and not can_eval:
            ra.notes.append("no checkpoint: per-token analyses skipped")
        if "vocab_size" in ra.results:
            vocab_entries.append((str(rec.path), ra.results["vocab_size"], ra.results["tokenizer"]))
            check_same_vocab(vocab_entries)
        results[str(rec.path)] = ra

    sections: list[Section] = []
    names = ", ".join(f"{g} ({len(r)} run{'s' if len(r) > 1 else ''})" for g, r in grouped.items())
    sections.append(Section(
        "Runs",
        f"Runs: {names}. Numbers are mean ± std over seeds where a run has several. Validation "
        "loss in nats/token; FLOPs/token are forward FLOPs (moelab.model.accounting).",
        runs_table(grouped),
    ))
    ra_grouped = {g: [results[str(r.path)] for r in recs] for g, recs in grouped.items()}
    sections.append(Section(
        "Routing summary",
        "Settle step and sparsity: ReMoE's stage III (sparsity held within ±0.03 of the target 1 − "
        "k/E). Dead experts: share of experts receiving < 1/(8E) of a layer's tokens. Rare − "
        "frequent: mean active experts of the rarest minus the most frequent fifth of the "
        "vocabulary. Domain KL: mean KL(domain ‖ all) of expert distributions. Usage/unevenness: "
        "PEER §3.3 (unevenness 0 = even, log N = one expert). Flip rate: share of validation "
        "tokens whose experts changed between the last two checkpoints.",
        analysis_table(ra_grouped),
    ))
    dom_table = eval_loss_table(ra_grouped)
    if dom_table:
        sections.append(Section(
            "Validation loss by domain (analysis pass)",
            "Mean loss (nats/token) of the analysis pass, whose windows are spread evenly over "
            "the whole split, so every domain is represented; the same tokens for every run.",
            dom_table,
        ))
    notes = [f"{Path(k).name}: {n}" for k, ra in results.items() for n in ra.notes]
    if plots_enabled:
        sections += _plot_sections(grouped, results, img_dir)
    if notes:
        sections.append(Section("Notes", "\n\n".join(notes)))
    md_path, html_path = render(title, sections, out)
    dump = {Path(k).name: {"path": k, "results": ra.results, "notes": ra.notes}
            for k, ra in results.items()}
    (out / "analysis.json").write_text(json.dumps(dump, indent=1), "utf-8")
    return {
        "markdown": md_path,
        "html": html_path,
        "images": sorted(img_dir.glob("*.png")) if img_dir.exists() else [],
        "results": dump,
        "seconds": time.time() - t0,
    }


def _plot_sections(
    grouped: dict[str, list[RunRecord]], results: dict[str, RunAnalysis], img_dir: Path
) -> list[Section]:
    """Plots of each group's first run (the representative seed), plus cross-run comparisons."""
    secs: list[Section] = []
    curves = {g: training_curves(recs[0]) for g, recs in grouped.items()}
    imgs = [plots.plot_loss_curves(curves, img_dir / "loss_curves.png")]
    finals = {g: mean_std([r.final_val()["val_loss"] for r in recs
                           if r.final_val()["val_loss"] is not None])
              for g, recs in grouped.items()}
    if any(math.isfinite(m) for m, _ in finals.values()):
        imgs.append(plots.plot_metric_bars(finals, "validation loss (nats/token)",
                                           "final validation loss (mean ± std over seeds)",
                                           img_dir / "final_val_loss.png"))
    secs.append(Section("Loss curves", "", images=imgs))

    dyn, load, comp, dom, use = [], [], [], [], []
    z_all: dict[str, np.ndarray] = {}
    for g, recs in grouped.items():
        ra = results[str(recs[0].path)]
        r = ra.results
        stem = _safe(g)
        d = r.get("dynamics", {})
        if "stages" in d:
            from moelab.analysis.stats import SparsityStages

            st = SparsityStages(**{k: (float("nan") if v is None and k.startswith("settled")
                                       else v) for k, v in d["stages"].items()})
            dyn.append(plots.plot_dynamics(curves[g], st, f"{g}: ReMoE training dynamics",
                                           img_dir / f"dynamics_{stem}.png"))
        if r.get("load") and any(v.get("load_fraction") for v in r["load"].values()):
            load.append(plots.plot_expert_load(r["load"], f"{g}: expert load (validation)",
                                               img_dir / f"load_{stem}.png"))
        elif r.get("train_load"):
            load.append(plots.plot_expert_load(r["train_load"],
                                               f"{g}: expert load (last logged training step)",
                                               img_dir / f"load_{stem}.png"))
        if r.get("compute"):
            comp.append(plots.plot_active_by_frequency(r["compute"], f"{g}: dynamic compute",
                                                       img_dir / f"compute_{stem}.png"))
        if r.get("domains", {}).get("layers") and len(r["domains"]["domains"]) > 1:
            dom.append(plots.plot_domain_shares(r["domains"], g, img_dir / f"domains_{stem}.png"))
        for lk, lt_use in (r.get("usage") or {}).items():
            if lt_use["kind"] in ("peer", "pkm") and lk in ra.z_primes:
                z_all[f"{g} layer {lk}"] = ra.z_primes[lk]
    if z_all:
        use.append(plots.plot_usage(z_all, "PEER/PKM", img_dir / "usage_peer.png"))
    text = {
        "Training dynamics": "Shaded: ReMoE's stages (red dense, yellow sparsifying, green "
        "stable); dashed: target sparsity; dotted: settling step.",
        "Expert load": "Share of each layer's (token, expert) assignments per expert on "
        "validation data. TopK runs carry a load-balancing loss; ReMoE's L1 is load-balanced.",
        "Dynamic compute": "Active experts per token by training-frequency bin of the token.",
        "Domain specialisation": "Share of each domain's routed tokens going to each expert.",
        "Expert usage (PEER/PKM)": "Experts sorted by gate mass z' = Σ_x g_i(x) on validation.",
    }
    for title, ims in (("Training dynamics", dyn), ("Expert load", load),
                       ("Dynamic compute", comp), ("Domain specialisation", dom),
                       ("Expert usage (PEER/PKM)", use)):
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
        secs.append(Section("Top tokens per expert",
                            "Tokens routed with the highest mean gate weight (first routed layer).",
                            [["run", "layer", "expert", "tokens"], *tops]))
    return secs
