"""Side-by-side experiment reports: ``report.md`` + self-contained ``report.html`` + PNG plots.

A report is built as a list of sections (text, tables, images) and rendered twice
(:mod:`moelab.analysis.render`), so Markdown and HTML always say the same thing. Runs sharing a
name up to a ``-seedN`` suffix (or grouped explicitly) are averaged: numbers are shown as
mean ± sample SD (ddof=1) over seeds (:mod:`moelab.analysis.tables`).
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from moelab.analysis import analyses
from moelab.analysis.compute import compute_text
from moelab.analysis.evalpass import (
    EvalSettings,
    check_same_vocab,
    load_model,
    model_vocab_size,
    run_eval_pass,
    tokenizer_id,
    train_token_counts,
)
from moelab.analysis.origin import (
    check_same_code,
    provenance_sections,
    provenance_warnings,
    read_provenance,
    sources_table,
)
from moelab.analysis.per_token import PER_TOKEN, per_token_results, results_from_file
from moelab.analysis.render import Section, render
from moelab.analysis.report_plots import plot_sections
from moelab.analysis.routing_file import save_routing as save_routing_file
from moelab.analysis.runs import RunAnalysis, RunRecord, read_run, sparsity_target, training_curves
from moelab.analysis.settings import comparability_warnings, settings_table
from moelab.analysis.tables import analysis_table, eval_loss_table, group_runs, runs_table
from moelab.rundir import RunDir

ANALYSIS_FILE = "analysis.json"


# ----------------------------------------------------------------------------- per run


def analyze_run(
    run_dir: str | Path,
    what: tuple[str, ...] | list[str] = analyses.ANALYSES,
    settings: EvalSettings | None = None,
    checkpoint: str | None = None,
    compare_checkpoint: str | None = None,
    tolerance: float = 0.03,
    save_routing: bool = False,
) -> RunAnalysis:
    """Run the requested analyses on one run directory.

    ``dynamics`` reads only ``metrics.jsonl``; the others run one evaluation pass with the trained
    model (:func:`moelab.analysis.evalpass.run_eval_pass`). ``stability`` compares
    ``compare_checkpoint`` (default: the previous checkpoint) with ``checkpoint`` (default: latest)
    and is skipped with a note when the run has a single checkpoint. ``save_routing`` writes the
    pass's routing statistics into the run (``RunDir.ROUTING``, :mod:`moelab.analysis.
    routing_file`). A run without checkpoints but with that file gets the per-token analyses
    from the file (:func:`moelab.analysis.per_token.results_from_file`).
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
    run = RunDir(rec.path)
    ckpts = run.checkpoints()
    if not ckpts and checkpoint is None and (run.path / RunDir.ROUTING).is_file():
        res, notes, out.z_primes = results_from_file(rec.path, per_token)
        out.results |= res
        out.notes += notes
        return out
    if not ckpts:
        raise ValueError(
            f"{rec.path}: no {RunDir.CHECKPOINTS}/{RunDir.STEP_PREFIX}* and no {RunDir.ROUTING}: "
            f"{', '.join(per_token)} need one of them (dynamics reads {RunDir.METRICS} alone)"
        )
    model, run_config = load_model(rec.path, checkpoint)
    trace, ds = run_eval_pass(model, run_config, settings, rec.path)
    current = str(checkpoint or ckpts[-1])
    previous, names = None, [current]
    if "stability" in what and trace.layers:
        if compare_checkpoint is None and len(ckpts) < 2:
            out.notes.append("stability: needs two checkpoints; this run has one")
        else:
            other = str(compare_checkpoint or ckpts[-2])
            model_b, cfg_b = load_model(rec.path, other)
            previous, _ = run_eval_pass(model_b, cfg_b, settings, rec.path)
            names = [other, current]
    counts = train_token_counts(ds) if "compute" in what else None
    out.results["vocab_size"] = model_vocab_size(model)
    out.results["tokenizer"] = tokenizer_id(rec.path, ds)
    decode = run.tokenizer(ds).decode if "top-tokens" in what else None
    res, notes, out.z_primes = per_token_results(
        per_token, trace, previous, train_counts_V=counts, decode=decode, checkpoints=names
    )
    out.results |= res
    out.notes += notes
    if save_routing:
        meta = {
            "checkpoints": names,
            "vocab_size": out.results["vocab_size"],
            "tokenizer": out.results["tokenizer"],
            "settings": asdict(settings),
            "analyses": per_token,
        }
        save_routing_file(
            run.path / RunDir.ROUTING, trace, previous, train_counts_V=counts, meta=meta
        )
    return out


# ----------------------------------------------------------------------------- report


def build_report(
    run_dirs: list[str | Path],
    out_dir: str | Path,
    *,
    groups: dict[str, list[str]] | None = None,
    analyze: bool = True,
    settings: EvalSettings | None = None,
    title: str = "moelab experiment report",
    plots_enabled: bool = True,
    mixed_code: str = "warn",
    html: bool = True,
    save_routing: bool = False,
) -> dict[str, Any]:
    """Write ``out_dir/report.md``, ``out_dir/report.html`` (unless ``html=False``) and the PNGs
    for ``run_dirs``.

    Every directory must be a run (ValueError naming it otherwise). With ``analyze``, each run
    with a checkpoint gets one evaluation pass for the per-token analyses; all analysed runs must
    share a vocabulary (ValueError naming the odd one). Runs with no routed layers or no
    checkpoint still get their row in the loss table. Returns paths, the warnings and the per-run
    results (also written to ``out_dir/analysis.json``).

    The report opens with its warnings (runs trained by different code, unmatched FLOPs or tokens,
    different data) and the runs' provenance. ``mixed_code`` decides what runs trained by
    different code get: ``"warn"`` (a warning), ``"refuse"`` (ValueError before anything is
    written: ``moelab compare``'s default) or ``"allow"`` (a warning saying it was allowed).
    ``save_routing`` writes each analysed run's routing statistics file into the run
    (``moelab compare`` does, for the runs it trained); a run without checkpoints but with that
    file is analysed from it.
    """
    if not run_dirs:
        raise ValueError("report: give at least one run directory")
    if mixed_code not in ("warn", "refuse", "allow"):
        raise ValueError(f"mixed_code: one of warn, refuse, allow; got {mixed_code!r}")
    out = Path(out_dir).expanduser()
    records = [read_run(d) for d in run_dirs]
    if mixed_code == "refuse":
        check_same_code(read_provenance(records), allow_mixed=False, where=str(out))
    settings = settings or EvalSettings()
    t0 = time.time()

    results: dict[str, RunAnalysis] = {}
    vocab_entries: list[tuple[str, int, str]] = []
    for rec in records:
        run = RunDir(rec.path)
        can_eval = analyze and (bool(run.checkpoints()) or (run.path / run.ROUTING).is_file())
        what = analyses.ANALYSES if can_eval else ("dynamics",)
        ra = analyze_run(rec.path, what, settings, save_routing=save_routing)
        if analyze and not can_eval:
            ra.notes.append("no checkpoint: per-token analyses skipped")
        if "vocab_size" in ra.results:
            vocab_entries.append((str(rec.path), ra.results["vocab_size"], ra.results["tokenizer"]))
            check_same_vocab(vocab_entries)
        results[str(rec.path)] = ra
    res = write_report(
        records,
        results,
        out,
        groups=groups,
        title=title,
        plots_enabled=plots_enabled,
        mixed_code=mixed_code,
        html=html,
    )
    res["seconds"] = time.time() - t0
    return res


def write_report(
    records: list[RunRecord],
    results: dict[str, RunAnalysis],
    out: Path,
    *,
    groups: dict[str, list[str]] | None = None,
    title: str = "moelab experiment report",
    plots_enabled: bool = True,
    mixed_code: str = "warn",
    html: bool = True,
    redraw: bool = False,
) -> dict[str, Any]:
    """Assemble and write the report of analysed runs (``results``: run path → its analysis):
    sections, plots, ``report.md``, ``report.html`` unless ``html=False``, ``analysis.json``.

    Separate from :func:`build_report` so that a report can be re-drawn from the runs' files and
    a saved ``analysis.json`` alone (:func:`read_analysis`; ``redraw=True``), without the
    checkpoints."""
    provenance = read_provenance(records)
    out.mkdir(parents=True, exist_ok=True)
    img_dir = out / "plots"
    grouped = group_runs(records, groups)
    sections: list[Section] = []
    warnings = provenance_warnings(
        provenance, allowed_mixed=mixed_code == "allow"
    ) + comparability_warnings(records, provenance)
    if warnings:
        sections.append(Section("Warnings", warnings=warnings))
    sections += provenance_sections(provenance)
    set_rows, set_marks = settings_table(grouped, provenance)
    sections.append(
        Section(
            "Run settings",
            "What each run was: experts E, experts per token k (PEER/PKM: heads × k), "
            "granularity, shared experts, learning rate, steps, tokens seen, measured forward "
            "FLOPs per training token, data "
            "(and any other config value that differs between the runs). Highlighted: the columns "
            "that differ between rows.",
            set_rows,
            highlight=set_marks,
        )
    )
    names = ", ".join(f"{g} ({len(r)} run{'s' if len(r) > 1 else ''})" for g, r in grouped.items())
    sections.append(
        Section(
            "Runs",
            f"Runs: {names}. Numbers are mean ± sample SD (ddof=1) over seeds where a run has "
            "several. Validation loss in nats/token. " + compute_text(records),
            runs_table(grouped),
        )
    )
    ra_grouped = {g: [results[str(r.path)].results for r in recs] for g, recs in grouped.items()}
    sections.append(
        Section(
            "Routing summary",
            "Settle step and sparsity: ReMoE's stage III (sparsity held within ±0.03 of the "
            "target 1 − k/E). Dead experts: share of experts receiving < 1/(8E) of a layer's "
            "tokens. Rare − frequent: mean active experts of the rarest minus the most frequent "
            "fifth of the vocabulary. Domain KL: mean KL(domain ‖ all) of expert distributions. "
            "Usage/unevenness: "
            "PEER §3.3 (unevenness 0 = even, log N = one expert). Flip rate: per layer, the share "
            "of the (token, expert) assignments made at either of the last two checkpoints that "
            "only one made (tokens routed nowhere at both are no assignments), mean over layers.",
            analysis_table(ra_grouped),
        )
    )
    dom_table = eval_loss_table(ra_grouped)
    if dom_table:
        sections.append(
            Section(
                "Validation loss by domain (analysis pass)",
                "Mean loss (nats/token) of the analysis pass, whose windows are spread evenly over "
                "the whole split, so every domain is represented; the same tokens for every run.",
                dom_table,
            )
        )
    sections.append(
        Section(
            "Per-run data",
            "Every number above comes from these files: the final validation loss is the summary's "
            "final_val_loss, logged on the metrics line linked here; routing numbers come from the "
            "analysis pass (analysis.json) and the logged training lines.",
            sources_table(records, out),
        )
    )
    notes = [f"{Path(k).name}: {n}" for k, ra in results.items() for n in ra.notes]
    if plots_enabled:
        sections += plot_sections(grouped, results, img_dir, keep_drawn=redraw)
    if notes:
        sections.append(Section("Notes", "\n\n".join(notes)))
    md_path, html_path = render(title, sections, out, html=html)
    dump = {
        Path(k).name: {"path": _relpath(Path(k), out), "results": ra.results, "notes": ra.notes}
        for k, ra in results.items()
    }
    write_analysis(out / ANALYSIS_FILE, dump)
    return {
        "markdown": md_path,
        "html": html_path,
        "warnings": warnings,
        "images": sorted(img_dir.glob("*.png")) if img_dir.exists() else [],
        "results": dump,
    }


def write_analysis(path: Path, dump: dict[str, Any]) -> None:
    """``analysis.json``: one compact line per run. Why: docs/results commits one per suite, where
    the pretty-printed layout was two fifths of the bytes, and one line per run still shows a
    change to one run's numbers as one line of a diff. Floats keep every digit (rounding them
    would round the report's numbers twice, and a redrawn report could differ in a last digit)."""
    lines = [f"{json.dumps(k)}: {json.dumps(v, separators=(',', ':'))}" for k, v in dump.items()]
    path.write_text("{\n" + ",\n".join(lines) + "\n}\n", "utf-8")


def read_analysis(out: Path, records: list[RunRecord]) -> dict[str, RunAnalysis]:
    """The per-run analyses saved in ``out/analysis.json``, keyed like :func:`write_report`'s
    ``results``, for ``records`` (ValueError naming a run the file lacks). What the runs' own
    files determine is recomputed rather than read back, so a redrawn report shows it as the
    current code computes it: the training dynamics (``metrics.jsonl``) and, for a run with a
    routing statistics file (``RunDir.ROUTING``), every per-token number it holds the inputs of,
    with the per-expert gate masses of the PEER/PKM usage plot (the top tokens of layers whose
    gate weights the file does not hold stay as saved). Without that file the saved numbers are
    kept and the gate masses come back empty."""
    path = out / ANALYSIS_FILE
    try:
        dump = json.loads(path.read_text("utf-8"))
    except FileNotFoundError:
        raise ValueError(f"{path}: missing; write the report with its analyses first") from None
    results = {}
    for rec in records:
        name = Path(rec.path).name
        if name not in dump:
            raise ValueError(f"{path}: has no analysis of run {name!r}")
        saved = dump[name]["results"]
        if "dynamics" in saved:  # a pure function of metrics.jsonl: recomputed by this code
            tol = (saved["dynamics"].get("stages") or {}).get("tolerance", 0.03)
            saved["dynamics"] = analyses.dynamics(training_curves(rec), sparsity_target(rec), tol)
        ra = RunAnalysis(rec, saved, dump[name]["notes"])
        if (Path(rec.path) / RunDir.ROUTING).is_file():
            res, _, ra.z_primes = results_from_file(rec.path, PER_TOKEN)
            if "top_tokens" in res:  # a layer whose gate weights the file lacks: as saved
                res["top_tokens"] = (saved.get("top_tokens") or {}) | res["top_tokens"]
            saved |= res
        results[str(rec.path)] = ra
    return results


def _relpath(path: Path, base: Path) -> str:
    """``path`` relative to the report directory (so analysis.json holds no machine's absolute
    paths and stays valid when the report and its runs are copied together)."""
    return Path(os.path.relpath(path.resolve(), base.resolve())).as_posix()
