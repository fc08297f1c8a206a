"""``moelab compare --suite NAME``: train a named suite of runs and report them side by side; or
``--suite compress``, a different kind (no training: trained runs compressed by every method,
:mod:`moelab.compress.suite`)."""

from __future__ import annotations

import argparse
import shlex
import sys

from moelab.commands.report import add_eval_arguments, eval_settings


def register(sub: argparse._SubParsersAction) -> None:
    from moelab.analysis.suites import SUITES

    names = ", ".join(f"{k} ({v['description']})" for k, v in SUITES.items())
    p = sub.add_parser(
        "compare",
        help="train a named suite (e.g. paper-mini) and write its report",
        description="Train every run of a suite (runs already finished under OUT/runs are "
        "kept, so an interrupted suite resumes), then write OUT/report.md and OUT/report.html "
        f"with seeds averaged. Suites: {names}. "
        f"{COMPRESS}: a different kind of suite, which trains nothing: the source runs (default "
        "remoe-seed0 and topk-seed0 of a `compare --suite paper` directory given as --from) are "
        "compressed by every registered method at the settings each declares (ratios of expert "
        "parameters kept 0.75, 0.5, 0.25; quantize int8 and int4), each evaluated on the whole "
        "validation split, into OUT/runs, OUT/rows, OUT/compress_report.md (resumable; sources "
        "are only read).",
    )
    p.add_argument(
        "--suite", required=False, choices=[*sorted(SUITES), COMPRESS], help="suite to run"
    )
    p.add_argument("-o", "--out", default=None, help="output directory (default runs/<suite>)")
    p.add_argument(
        "--seeds",
        type=int,
        nargs="+",
        default=None,
        help="seeds (default: the suite's, e.g. 0 1 2 for paper-mini)",
    )
    p.add_argument(
        "--steps",
        type=int,
        default=None,
        help="override train.steps of every run (quick, reduced suites)",
    )
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra dotted override for every run, e.g. --set train.threads=2",
    )
    p.add_argument(
        "--jobs",
        type=int,
        default=1,
        help="train this many runs at once, each in its own process (default 1)",
    )
    p.add_argument("--list", action="store_true", help="list the suites and their runs, then exit")
    p.add_argument("--dry-run", action="store_true", help="print the planned runs, train nothing")
    p.add_argument(
        "--no-analysis", action="store_true", help="report without the per-token analysis pass"
    )
    p.add_argument(
        "--allow-mixed",
        action="store_true",
        help="report runs trained by different code (another commit, or uncommitted "
        "changes on one side) together; refused by default, and the report says so "
        "at the top when allowed",
    )
    add_eval_arguments(p)
    c = p.add_argument_group(f"--suite {COMPRESS}")
    c.add_argument("--from", dest="from_dir", metavar="DIR", help="a `compare --suite paper` OUT")
    c.add_argument(
        "--source",
        dest="sources",
        action="append",
        default=[],
        metavar="LABEL=RUN",
        help="a source run (a path, or a run name under DIR/runs); repeat; default "
        "remoe=remoe-seed0 topk=topk-seed0",
    )
    c.add_argument("--methods", nargs="+", default=None, help="default: every registered method")
    c.add_argument("--ratios", type=float, nargs="+", default=None, help="default: 0.75 0.5 0.25")
    c.add_argument("--heal-steps", type=int, default=0, help="train each compressed run N steps")
    c.add_argument("--calib-batches", type=int, default=16, help="calibration batches (16)")
    p.set_defaults(func=run)


COMPRESS = "compress"


def run_compress(args: argparse.Namespace) -> int:
    """``--suite compress`` (see :mod:`moelab.compress.suite`): the runs and rows, then the
    report (:mod:`moelab.analysis.compress_report`)."""
    from moelab.analysis.compress_report import write_compress_report
    from moelab.compress.suite import run_compress_suite, shown_path

    sources = {}
    for item in args.sources:
        label, eq, where = item.partition("=")
        if not eq or not label or not where:
            raise ValueError(f"--source: expected LABEL=RUN, got {item!r}")
        sources[label] = where
    out = args.out or f"runs/{COMPRESS}"
    words = ["moelab", "compare", "--suite", COMPRESS, "--out", str(out)]
    words += ["--from", shown_path(args.from_dir)] if args.from_dir else []
    words += [w for s in args.sources for w in ("--source", s)]
    words += ["--methods", *args.methods] if args.methods else []
    words += ["--ratios", *map(str, args.ratios)] if args.ratios else []
    words += ["--heal-steps", str(args.heal_steps)] if args.heal_steps else []
    words += ["--calib-batches", str(args.calib_batches)] if args.calib_batches != 16 else []
    res = run_compress_suite(
        out,
        from_dir=args.from_dir,
        sources=sources or None,
        methods=args.methods,
        ratios=tuple(args.ratios) if args.ratios else None,
        heal_steps=args.heal_steps,
        calib_batches=args.calib_batches,
        command=shlex.join(words),
    )
    report = write_compress_report(res["rows"], out)
    print(f"wrote {report['markdown']} ({len(res['rows'])} rows, {res['seconds']:.0f} s)")
    return 0


def command_line(args: argparse.Namespace, out: str) -> str:
    """The command as one would type it again (recorded in suite.json)."""
    words = ["moelab", "compare", "--suite", args.suite, "--out", str(out)]
    if args.seeds is not None:
        words += ["--seeds", *map(str, args.seeds)]
    if args.steps is not None:
        words += ["--steps", str(args.steps)]
    for o in args.overrides:
        words += ["--set", o]
    if args.jobs != 1:
        words += ["--jobs", str(args.jobs)]
    for flag in ("no_analysis", "allow_mixed"):
        if getattr(args, flag):
            words.append("--" + flag.replace("_", "-"))
    for name in ("dataset", "seq_len", "batch_size"):
        if getattr(args, name) is not None:
            words += ["--" + name.replace("_", "-"), str(getattr(args, name))]
    if args.split != "val":
        words += ["--split", args.split]
    if args.max_batches != 16:
        words += ["--max-batches", str(args.max_batches)]
    return shlex.join(words)


def run(args: argparse.Namespace) -> int:
    from moelab.analysis.suites import SUITES, plan_suite, run_suite

    if args.list:
        for name, suite in SUITES.items():
            print(f"{name}: {suite['description']} (seeds {suite['seeds']})")
            for run_name, spec in suite["runs"].items():
                print(f"  {run_name:<12} preset {spec['preset']} {' '.join(spec['overrides'])}")
        return 0
    if not args.suite:
        raise ValueError("--suite: required (or --list)")
    if args.suite == COMPRESS:
        return run_compress(args)
    out = args.out or f"runs/{args.suite}"
    if args.dry_run:
        for p in plan_suite(args.suite, out, args.seeds, args.steps, args.overrides):
            print(f"{p.run_dir}  preset {p.preset}  {' '.join(p.overrides)}")
        return 0
    res = run_suite(
        args.suite,
        out,
        seeds=args.seeds,
        steps=args.steps,
        extra_overrides=args.overrides,
        analyze=not args.no_analysis,
        report_settings=eval_settings(args),
        allow_mixed=args.allow_mixed,
        command=command_line(args, out),
        jobs=args.jobs,
    )
    for w in res["warnings"]:
        print(f"moelab: warning: {w}", file=sys.stderr)
    print(f"wrote {res['markdown']}")
    print(f"wrote {res['html']} ({len(res['images'])} plots, total {res['train_seconds']:.0f} s)")
    return 0
