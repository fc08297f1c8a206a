"""The generated results blocks of docs/results/README.md and docs/results/<suite>/README.md.

Every number a reader sees in those results comes from the committed files of a suite
directory (``suite.json``, ``runs/<run>/summary.json`` / ``provenance.json`` / ``metrics.jsonl``,
``analysis.json``), rendered here between ``<!-- results:begin -->`` and ``<!-- results:end -->``:
nothing is copied by hand, so nothing can drift from the data. The verdicts on the papers'
claims ("does ReMoE beat TopK?") are computed from the same files
(:mod:`moelab.analysis.claims`), so a rerun that changes an outcome changes the verdict too.
:func:`check_blocks` is what a test runs: it fails when a committed block differs from what the
committed files give.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from moelab.analysis.claim_sets import CLAIMS
from moelab.analysis.claims import _by_experts, _dead, _flip, _imbalance
from moelab.analysis.compute import (
    COMPUTE_TOLERANCE,
    compute_matched,
    measured_flops_per_token,
    source_sentence,
)
from moelab.analysis.origin import run_fields
from moelab.analysis.runs import RunRecord
from moelab.analysis.suite_data import (
    BEGIN,
    END,
    NOTICE,
    SuiteData,
    _pm,
    _si,
    _table,
    load_suite,
)
from moelab.analysis.suite_record import RUNS_SUBDIR, SUITE_FILE
from moelab.analysis.suites import SUITES
from moelab.rundir import RunDir

# ----------------------------------------------------------------------------- rendering

RULE = (
    "Verdicts: a paired t-test over matched seeds (same seed, same data order); **yes** when the "
    "95% confidence interval of the mean difference excludes zero in the claimed direction, "
    "**contradicted** when it excludes zero the other way, **not shown** otherwise; with one "
    "seed **indicative** at most. ± is the sample SD over seeds (ddof=1); flip rate is per layer "
    "on (token, expert) assignments; sparsity is judged per layer against its within-run SD."
)


def _provenance_line(sd: SuiteData) -> str:
    values: dict[str, list[str]] = {}
    for recs in sd.provenance.values():
        for label, v in run_fields(recs).items():
            if v not in values.setdefault(label, []):
                values[label].append(v)

    def one(label: str) -> str:
        v = values.get(label, ["?"])
        return v[0] if len(v) == 1 else "mixed: " + " / ".join(v)

    return (
        f"code `{one('code (git commit)')}`, moelab {one('moelab')}, torch "
        f"{one('torch')}, {one('device')} ({one('CPU')}), {one('torch threads')} torch "
        f"thread(s) per run, data {one('data')}"
    )


def _loss_table(sd: SuiteData) -> list[str]:
    rows = [
        ["run", "seeds", "val loss (nats/token, mean ± SD)", "measured FLOPs/token", "tokens seen"]
    ]
    for g, names in sd.groups.items():
        recs = [sd.runs[n] for n in names]
        tok = {_si(r.summary.get("tokens")) for r in recs}
        rows.append(
            [
                g,
                str(len(names)),
                _pm(list(sd.losses(g).values())),
                _measured(recs),
                " / ".join(sorted(tok)),
            ]
        )
    return _table(rows)


def _measured(recs: list[RunRecord]) -> str:
    """Mean over seeds of the measured FLOPs/token (:mod:`moelab.analysis.compute`), with the
    seeds' range where they differ by more than 0.5%."""
    v = [x for x in map(measured_flops_per_token, recs) if x is not None]
    if not v:
        return "–"
    mean = _si(float(np.mean(v)))
    return mean if max(v) <= 1.005 * min(v) else f"{mean} ({_si(min(v))}–{_si(max(v))})"


def _reference(g: str, groups: list[str]) -> str | None:
    """The TopK setting a group's compute is compared with: the one named like it with ``topk``
    for its method (``remoe-E8`` → ``topk-E8``), else ``topk``, else the first setting."""
    rest = g.split("-", 1)[1] if "-" in g else ""
    for ref in (f"topk-{rest}" if rest else "", "topk", groups[0] if groups else ""):
        if ref in groups:
            return ref
    return None


def _compute_lines(sd: SuiteData) -> list[str]:
    """Where the measured FLOPs come from, and which settings do not spend the compute of their
    TopK reference (:func:`_reference`): a claim "at equal active compute" between two settings
    holds only within the tolerance, otherwise it is one per unit of measured compute."""
    recs = {g: [sd.runs[n] for n in names] for g, names in sd.groups.items()}
    if not recs:
        return []
    off = []
    for g, rs in recs.items():
        ref = _reference(g, list(recs))
        m = compute_matched(rs, recs[ref]) if ref is not None and ref != g else None
        if m is not None and not m[1]:
            off.append(f"{g} {100 * m[0]:+.0f}% vs {ref}")
    text = source_sentence([r for rs in recs.values() for r in rs])
    tol = f"{100 * COMPUTE_TOLERANCE:.0f}%"
    if off:
        text += (
            f" Not at equal measured compute (more than {tol} apart): "
            + ", ".join(off)
            + '; a comparison of these "at equal active compute" holds only per unit of '
            "measured compute (the report's plot of validation loss against measured FLOPs)."
        )
    else:
        text += f" Every setting is within {tol} of its TopK reference's measured FLOPs/token."
    return ["", text]


def _experts_per_token(run: RunRecord) -> float | None:
    """Routed FFN experts per token over the last logged training steps (layer mean): the real
    expert compute of routers whose count varies (ReLU, top-p, null / zero-computation experts)."""
    values = [
        st["active_mean"]
        for line in run.train[-5:]
        for st in (line.get("layers") or {}).values()
        if st.get("active_mean") is not None
    ]
    return float(np.mean(values)) if values else None


def _routers_table(sd: SuiteData) -> list[str]:
    rows = [
        [
            "run",
            "method",
            "val loss",
            "FFN experts / token",
            "measured FLOPs / token",
            "tokens/s",
            "max expert share × E",
            "flip rate",
        ]
    ]
    for g, names in sd.groups.items():
        recs = [sd.runs[n] for n in names]
        per_tok = [v for v in map(_experts_per_token, recs) if v is not None]
        speed = [float(r.summary["tokens_per_s"]) for r in recs if r.summary.get("tokens_per_s")]
        rows.append(
            [
                g,
                recs[0].method,
                _pm(list(sd.losses(g).values())),
                _pm(per_tok, 2),
                _measured(recs),
                _pm(speed, 0),
                _pm(list(sd.metric(g, _imbalance).values()), 2),
                _pm(list(sd.metric(g, _flip).values()), 2),
            ]
        )
    return ["", *_table(rows)]


def _extra_table(sd: SuiteData) -> list[str]:
    """Suite-specific numbers: the experts-scaling grid, the load-balance load table, the
    routers' compute and balance."""
    if sd.name == "routers":
        return _routers_table(sd)
    if sd.name == "experts-scaling" and _by_experts(sd):
        rows = [
            [
                "E",
                "TopK val loss",
                "ReMoE val loss",
                "ReMoE − TopK",
                "TopK flip rate",
                "ReMoE flip rate",
            ]
        ]
        for e, (t, r) in _by_experts(sd).items():
            lt, lr = list(sd.losses(t).values()), list(sd.losses(r).values())
            diff = f"{np.mean(lr) - np.mean(lt):+.3f}" if lt and lr else "–"
            rows.append(
                [
                    str(e),
                    _pm(lt),
                    _pm(lr),
                    diff,
                    _pm(list(sd.metric(t, _flip).values()), 2),
                    _pm(list(sd.metric(r, _flip).values()), 2),
                ]
            )
        return ["", *_table(rows)]
    if sd.name == "load-balance":
        rows = [["run", "val loss", "nearly-dead experts", "max expert share × E", "flip rate"]]
        for g in sd.groups:
            rows.append(
                [
                    g,
                    _pm(list(sd.losses(g).values())),
                    _pm(list(sd.metric(g, _dead).values()), 1, pct=True),
                    _pm(list(sd.metric(g, _imbalance).values()), 2),
                    _pm(list(sd.metric(g, _flip).values()), 2),
                ]
            )
        return ["", *_table(rows)]
    return []


def _claims_table(sd: SuiteData) -> list[str]:
    fn = CLAIMS.get(sd.name)
    rows = [["claim", "paper", "here (test and outcome)", "verdict"]]
    for claim, paper, res in fn(sd) if fn else []:
        if res is not None:
            rows.append([claim, paper, res[0], f"**{res[1]}**"])
    if len(rows) == 1:
        return []
    return ["", *_table(rows), "", RULE]


def _runs_table(sd: SuiteData, base: str) -> list[str]:
    rows = [["run", "seed", "final val loss (metrics line)", "tokens", "provenance"]]
    for n, r in sd.runs.items():
        v = r.final_val()["val_loss"]
        line = r.final_eval_line()
        loss = "–" if v is None else f"{float(v):.4f}"
        if line is not None:
            loss = f"[{loss} (line {line})]({base}/{RUNS_SUBDIR}/{n}/{RunDir.METRICS}#L{line})"
        rows.append(
            [
                f"[{n}]({base}/{RUNS_SUBDIR}/{n}/)",
                str(sd.seeds[n]),
                loss,
                _si(r.summary.get("tokens")),
                f"[provenance]({base}/{RUNS_SUBDIR}/{n}/{RunDir.PROVENANCE})",
            ]
        )
    return ["", *_table(rows)]


def render_suite(name: str, suite_dir: Path, base: str, detail: bool = False) -> list[str]:
    """Markdown lines for one suite; ``base`` is the suite directory relative to the file the
    block is in (links), ``detail`` adds the per-run table (the suite's own README)."""
    sd, why = load_suite(suite_dir)
    desc = SUITES.get(name, {}).get("description", "")
    head = f"**`{name}`**" + (f" ({desc})" if desc else "")
    if sd is None:
        earlier = (
            f" (an earlier report without them: [report.md]({base}/report.md))"
            if (suite_dir / "report.md").is_file()
            else ""
        )
        return [f"{head}: {why}; `make results` generates them{earlier}.", ""]
    rec = sd.record
    n_runs = len(sd.runs)
    took = ""
    if rec.get("train_seconds") is not None:
        total = rec["train_seconds"] + (rec.get("report_seconds") or 0)
        took = f" in {total / 60:.0f} min" if total >= 600 else f" in {total / 60:.1f} min"
    cmd = f"`{rec['command']}`" if rec.get("command") else f"`moelab compare --suite {name}`"
    lines = [
        f"{head}: {cmd}, {n_runs} runs ({len(sd.groups)} settings × seeds "
        f"{', '.join(map(str, rec.get('seeds', [])))}), run{took}; {_provenance_line(sd)}. "
        f"[report]({base}/report.md) · [per-run data]({base}/{RUNS_SUBDIR}/) · "
        f"[suite.json]({base}/{SUITE_FILE})",
        "",
        *_loss_table(sd),
        *_compute_lines(sd),
        *_extra_table(sd),
        *_claims_table(sd),
    ]
    for w in rec.get("warnings") or []:
        lines += ["", f"> **Warning:** {w}"]
    if detail:
        lines += _runs_table(sd, base)
    return [*lines, ""]


def suite_names(results_dir: Path) -> list[str]:
    """The suites of ``moelab.analysis.suites.SUITES`` in their order, then any other suite
    directory under ``results_dir``."""
    extra = (
        sorted(
            p.name
            for p in results_dir.glob("*")
            if (p / SUITE_FILE).is_file() and p.name not in SUITES
        )
        if results_dir.is_dir()
        else []
    )
    return [*SUITES, *extra]


INDEX = "README.md"  # docs/results/README.md: every suite's block, under a page of prose
INDEX_TEMPLATE = "# moelab results\n\n{begin}\n{end}\n"


def render_index_block(results_dir: Path) -> str:
    """The block of ``docs/results/README.md``: every suite, links relative to that directory."""
    lines = [NOTICE, ""]
    for name in suite_names(results_dir):
        lines += render_suite(name, results_dir / name, name)
    return "\n".join(lines).rstrip() + "\n"


def render_suite_block(suite_dir: Path) -> str:
    """The block of ``docs/results/<suite>/README.md``: that suite, with the per-run table."""
    lines = [NOTICE, "", *render_suite(suite_dir.name, suite_dir, ".", detail=True)]
    return "\n".join(lines).rstrip() + "\n"


def replace_block(text: str, block: str, where: str) -> str:
    """``text`` with the part between the markers replaced by ``block``; ValueError when the
    markers are missing, repeated or out of order."""
    if text.count(BEGIN) != 1 or text.count(END) != 1 or text.index(BEGIN) > text.index(END):
        raise ValueError(f"{where}: needs exactly one {BEGIN} ... {END} block")
    head, rest = text.split(BEGIN)
    _, tail = rest.split(END)
    return f"{head}{BEGIN}\n{block}{END}{tail}"


def targets(results_dir: Path) -> dict[Path, str]:
    """Every file holding a results block → the block it should hold: ``results_dir/README.md``
    (the index of all suites), and each suite directory's README.md that has the markers."""
    out = {results_dir / INDEX: render_index_block(results_dir)}
    for name in suite_names(results_dir):
        path = results_dir / name / INDEX
        if path.is_file() and BEGIN in path.read_text("utf-8"):
            out[path] = render_suite_block(results_dir / name)
    return out


def write_blocks(results_dir: Path) -> list[Path]:
    """Rewrite every results block from the files; returns the files that changed. A missing
    index (a fresh ``--results`` directory) is created holding just its block."""
    changed = []
    index = results_dir / INDEX
    if not index.is_file():
        results_dir.mkdir(parents=True, exist_ok=True)
        index.write_text(INDEX_TEMPLATE.format(begin=BEGIN, end=END), "utf-8")
    for path, block in targets(results_dir).items():
        old = path.read_text("utf-8")
        new = replace_block(old, block, str(path))
        if new != old:
            path.write_text(new, "utf-8")
            changed.append(path)
    return changed


def check_blocks(results_dir: Path) -> list[str]:
    """One message per file whose results block differs from what the committed files give
    (empty: everything is current)."""
    problems = []
    for path, block in targets(results_dir).items():
        try:
            new = replace_block(old := path.read_text("utf-8"), block, str(path))
        except FileNotFoundError:
            problems.append(f"{path}: missing; run scripts/results_readme.py (or make results)")
            continue
        except ValueError as err:
            problems.append(str(err))
            continue
        if new != old:
            problems.append(
                f"{path}: results block differs from what {results_dir} gives; "
                "run scripts/results_readme.py (or make results)"
            )
    return problems
