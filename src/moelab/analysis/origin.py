"""Where a report's numbers come from: each run's provenance (code, software, machine, data),
whether the runs can be compared bit for bit, the refusal to mix code versions in one suite, and
the table that links each run's headline number to the metrics line it was logged on.

A reader can only trust a comparison if the compared runs were produced by the same code: a suite
resumed after a code change would silently put two versions side by side. ``moelab.provenance``
records the facts in every run (``provenance.json``, one record per training process); this module
turns them into the report's header and its warnings.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from moelab import provenance as prov
from moelab.analysis.render import Link, Section
from moelab.analysis.runs import RunRecord
from moelab.rundir import RunDir

# What the header shows, in order: (label, function of one provenance record).
FIELDS: tuple[tuple[str, Any], ...] = (
    ("moelab", lambda r: str(r.get("moelab"))),
    ("code (git commit)", lambda r: code_version(r)),
    ("torch", lambda r: f"{r.get('torch')} (CUDA {r.get('torch_cuda') or 'none'})"),
    ("python", lambda r: str(r.get("python"))),
    ("device", lambda r: str(r.get("device")) + (f" ({r['gpu']})" if r.get("gpu") else "")),
    ("CPU", lambda r: str(r.get("cpu"))),
    ("torch threads", lambda r: str(r.get("threads"))),
    ("data", lambda r: data_label(r)),
)
NO_PROVENANCE = "unknown (no provenance record: trained before moelab recorded one)"
Provenance = dict[str, list[dict[str, Any]]]  # run name → its records, oldest first


def code_version(record: dict[str, Any] | None) -> str:
    """``<commit 12> `` plus ``+dirty`` when the tree had uncommitted changes; ``unknown`` when the
    run has no record or was trained outside a git checkout."""
    if not record:
        return "unknown"
    commit = record.get("git_commit")
    if not commit:
        return "unknown (not a git checkout)"
    return f"{commit[:12]}{'+dirty' if record.get('git_dirty') else ''}"


def data_label(record: dict[str, Any]) -> str:
    """The dataset's directory name and the first 12 hex digits of its checksum."""
    data, sha = record.get("data"), record.get("data_sha256")
    name = Path(data).name if data else "?"
    return f"{name} (sha256 {sha[:12]})" if sha else name


def read_provenance(records: list[RunRecord]) -> Provenance:
    """Each run's provenance records (``RunDir.provenance``), keyed by run name."""
    return {r.name: RunDir(r.path).provenance() for r in records}


def run_fields(records: list[dict[str, Any]]) -> dict[str, str]:
    """One run's header values; a value that changed between its training processes (a resume on
    other code or another machine) reads ``old → new``."""
    if not records:
        return {label: NO_PROVENANCE if i == 1 else "–" for i, (label, _) in enumerate(FIELDS)}
    out = {}
    for label, fn in FIELDS:
        seen: list[str] = []
        for r in records:
            v = fn(r)
            if v not in seen:
                seen.append(v)
        out[label] = " → ".join(seen)
    return out


def code_versions(provenance: Provenance) -> dict[str, list[str]]:
    """``code version → runs`` over every training process of every run (a run resumed on other
    code appears under both versions)."""
    out: dict[str, list[str]] = {}
    for name, records in provenance.items():
        for version in sorted({code_version(r) for r in records} or {"unknown"}):
            out.setdefault(version, []).append(name)
    return out


def mixed_code_message(provenance: Provenance) -> str | None:
    """A sentence naming the code versions when the runs come from more than one (a different
    commit, or uncommitted changes on one side, or an unknown version); None otherwise."""
    versions = code_versions(provenance)
    if len(versions) < 2:
        return None
    parts = "; ".join(f"{v}: {', '.join(runs)}" for v, runs in versions.items())
    return f"these runs were trained by different code ({parts})"


def check_same_code(provenance: Provenance, allow_mixed: bool, where: str) -> None:
    """Refuse (ValueError) runs trained by different code unless ``allow_mixed``."""
    msg = mixed_code_message(provenance)
    if msg and not allow_mixed:
        raise ValueError(
            f"{where}: {msg}. Numbers from different code are not one experiment: train the "
            "runs again on one commit (delete the stale run directories), or pass --allow-mixed "
            "to report them together anyway (the report then says so at the top)"
        )


def provenance_warnings(provenance: Provenance, allowed_mixed: bool) -> list[str]:
    """The header's warnings: mixed code (prominent: allowed only on request), uncommitted
    changes, runs without a record."""
    out = []
    msg = mixed_code_message(provenance)
    if msg:
        how = " (reported together because --allow-mixed was given)" if allowed_mixed else ""
        out.append(
            f"MIXED CODE VERSIONS: {msg}{how}; differences between these runs may come "
            "from the code, not from what the runs compare"
        )
    dirty = [n for n, recs in provenance.items() if any(r.get("git_dirty") for r in recs)]
    if dirty:
        out.append(
            f"trained from a tree with uncommitted changes ({', '.join(dirty)}): no commit "
            "holds the exact code behind these numbers"
        )
    missing = [n for n, recs in provenance.items() if not recs]
    if missing:
        out.append(
            f"no provenance record for {', '.join(missing)}: which code, torch and machine "
            "trained them is unknown"
        )
    return out


def bitwise_note(provenance: Provenance) -> str:
    """Whether rerunning reproduces these numbers exactly (docs/analysis.md, "Reproducibility")."""
    flat = {f"{n} #{i}": r for n, recs in provenance.items() for i, r in enumerate(recs)}
    if not flat:
        return "No run has a provenance record, so whether they reproduce is unknown."
    diff = prov.differences(flat)
    if not diff:
        return (
            "Bit for bit: every training process ran the same commit, torch build, CPU model "
            "and thread count, so rerunning them there reproduces every logged number "
            "exactly; on another CPU or torch build they agree only within tolerance."
        )
    return (
        f"Not bit for bit: the runs differ in {', '.join(sorted(diff))}, so their numbers "
        'agree with a rerun only within tolerance (docs/analysis.md, "Reproducibility").'
    )


def provenance_sections(provenance: Provenance) -> list[Section]:
    """The header: one table when every run agrees (values shown once), else the common values
    plus a per-run table of the differing ones (highlighted)."""
    per_run = {n: run_fields(recs) for n, recs in provenance.items()}
    labels = [label for label, _ in FIELDS]
    differing = [lb for lb in labels if len({f[lb] for f in per_run.values()}) > 1]
    rows = [["", "all runs"]]
    highlight = set()
    first = next(iter(per_run.values()), {})
    for i, lb in enumerate(labels, 1):
        if lb in differing:
            rows.append([lb, "differs between runs (next table)"])
            highlight.add((i, 1))
        else:
            rows.append([lb, first.get(lb, "–")])
    text = (
        f"What produced these numbers ({len(per_run)} run{'s' * (len(per_run) != 1)}, from "
        "each run's provenance.json). " + bitwise_note(provenance)
    )
    secs = [Section("Provenance", text, rows, highlight=highlight)]
    if differing:
        table = [["run", *differing]]
        table += [[n, *(f[lb] for lb in differing)] for n, f in per_run.items()]
        secs.append(
            Section(
                "Provenance by run",
                "The values that differ between runs.",
                table,
                highlight={
                    (i, j) for i in range(1, len(table)) for j in range(1, len(differing) + 1)
                },
            )
        )
    return secs


def _rel(target: Path, base: Path) -> str:
    return Path(os.path.relpath(target.resolve(), base.resolve())).as_posix()


def sources_table(records: list[RunRecord], out_dir: Path) -> list[list[str]]:
    """Per run: the final validation loss linked to the metrics line it was logged on, the tokens
    seen, and links to the run's config, summary and provenance (relative to the report, so they
    keep working when the report and its runs are copied together, e.g. into docs/results)."""
    rows = [["run", "final val loss (metrics line)", "tokens", "config", "summary", "provenance"]]
    for r in records:
        base = _rel(r.path, out_dir)
        fv = r.final_val()["val_loss"]
        line = r.final_eval_line()
        loss = "–" if fv is None else f"{float(fv):.4f}"
        if line is not None:
            loss_cell: str = Link(f"{loss} (line {line})", f"{base}/{RunDir.METRICS}#L{line}")
        else:
            loss_cell = loss
        tokens = r.summary.get("tokens") or (r.train[-1].get("tokens") if r.train else None)
        has_prov = bool(RunDir(r.path).provenance())
        rows.append(
            [
                Link(r.name, f"{base}/"),
                loss_cell,
                "–" if tokens is None else f"{int(tokens):,}",
                Link("config", f"{base}/{RunDir.CONFIG}") if RunDir(r.path).holds_run else "–",
                Link("summary", f"{base}/{RunDir.SUMMARY}") if RunDir(r.path).has_summary else "–",
                Link("provenance", f"{base}/{RunDir.PROVENANCE}") if has_prov else "–",
            ]
        )
    return rows
