"""``moelab report RUN_DIR [RUN_DIR ...] --out DIR``: side-by-side report of finished runs."""

from __future__ import annotations

import argparse
import sys


def add_eval_arguments(p: argparse.ArgumentParser) -> None:
    """Options of the per-token evaluation pass (shared by report, analyze and compare)."""
    p.add_argument(
        "--dataset",
        default=None,
        help="prepared dataset to analyse on (default: each run's own data)",
    )
    p.add_argument(
        "--split",
        default="val",
        choices=["train", "val"],
        help="split read by the per-token analyses (default val)",
    )
    p.add_argument(
        "--seq-len",
        type=int,
        default=None,
        help="window length of the analysis pass (default: the run's data.seq_len)",
    )
    p.add_argument(
        "--batch-size",
        type=int,
        default=None,
        help="windows per analysis batch (default: the run's data.eval_batch_size)",
    )
    p.add_argument(
        "--max-batches", type=int, default=16, help="analysis batches per run (0: the whole split)"
    )


def eval_settings(args: argparse.Namespace):  # -> EvalSettings (lazy import keeps CLI fast)
    from moelab.analysis.evalpass import EvalSettings

    for name in ("batch_size", "max_batches", "seq_len"):
        v = getattr(args, name)
        if v is not None and v < (0 if name == "max_batches" else 1):
            raise ValueError(f"--{name.replace('_', '-')}: must be positive, got {v}")
    return EvalSettings(
        dataset=args.dataset,
        split=args.split,
        seq_len=args.seq_len,
        batch_size=args.batch_size,
        max_batches=args.max_batches or None,
    )


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "report",
        help="write report.md + report.html comparing finished runs",
        description="Compare finished runs side by side: a table (method, active/total params, "
        "FLOPs/token, tokens, final validation loss/perplexity overall and per domain, tokens/s; "
        "seeds named NAME-seedN are averaged as mean ± SD) and the routing analyses as PNG plots "
        "(training dynamics with ReMoE's stages, expert load, active experts vs token frequency, "
        "domain specialisation, PEER/PKM usage), headed by the runs' provenance, their settings "
        "and warnings (different code, unmatched FLOPs or tokens, different data). Writes "
        "OUT/report.md, a self-contained OUT/report.html, OUT/plots/*.png and OUT/analysis.json.",
    )
    p.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run directories (moelab train)")
    p.add_argument("-o", "--out", required=True, help="output directory (created)")
    p.add_argument("--title", default="moelab experiment report", help="report title")
    p.add_argument(
        "--no-analysis",
        action="store_true",
        help="skip the per-token analysis pass (tables and logged curves only)",
    )
    p.add_argument("--no-plots", action="store_true", help="write tables only (no matplotlib)")
    add_eval_arguments(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from moelab.analysis.report import build_report

    res = build_report(
        args.runs,
        args.out,
        analyze=not args.no_analysis,
        settings=eval_settings(args),
        title=args.title,
        plots_enabled=not args.no_plots,
    )
    for w in res["warnings"]:
        print(f"moelab: warning: {w}", file=sys.stderr)
    print(f"wrote {res['markdown']}")
    print(f"wrote {res['html']} ({len(res['images'])} plots embedded, {res['seconds']:.1f} s)")
    return 0
