"""``moelab lm-eval RUN_OR_EXPORT``: lm-eval tasks (default: the local cloze task) on a run."""

from __future__ import annotations

import argparse
import json

from moelab.commands._decoding import add_decoding_options, decoding_options


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "lm-eval",
        help="evaluate a run or an export with the lm-eval harness (default task: moelab_cloze)",
        description="Run EleutherAI lm-eval tasks on a moelab run (through moelab's lm-eval "
        "model) or on a `moelab export-hf` directory (through lm-eval's hf model). The default "
        "task, moelab_cloze, is built locally from a dataset's held-out split: next-word "
        "multiple choice, 4 choices. A run is scored under --decoding (plain, scmoe or reroute: "
        "MoE-aware decoding, teacher-forced); an export decodes plainly. Needs `pip install "
        "lm-eval`.",
    )
    p.add_argument("path", metavar="RUN_OR_EXPORT")
    p.add_argument("--tasks", default="moelab_cloze", help="comma-separated lm-eval task names")
    p.add_argument("--include-path", default=None, help="a directory of your own task YAMLs")
    p.add_argument(
        "--data", default=None, help="dataset for the cloze task (default: the run's own)"
    )
    p.add_argument("--items", type=int, default=300, help="cloze items (default 300)")
    p.add_argument("--limit", type=int, default=None, help="at most N documents per task")
    p.add_argument("--task-dir", default=None, help="where to write the cloze task")
    p.add_argument("--checkpoint", default=None, help="step number or step_* name")
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    add_decoding_options(p, mode=True)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        raise ValueError(
            "lm-eval: the lm-eval package is not installed (pip install lm-eval)"
        ) from None
    from moelab.hf.harness import evaluate

    results = evaluate(
        args.path,
        tasks=[t.strip() for t in args.tasks.split(",") if t.strip()],
        include_path=args.include_path,
        data=args.data,
        items=args.items,
        limit=args.limit,
        task_dir=args.task_dir,
        checkpoint=args.checkpoint,
        decoding=args.decoding,
        decoding_options=decoding_options(args),
    )
    if args.json:
        print(json.dumps(results, indent=2))
        return 0
    for task, metrics in results.items():
        shown = []
        for k, v in metrics.items():
            if isinstance(v, float) and "stderr" not in k:
                err = metrics.get(f"{k}_stderr")
                shown.append(f"{k} {v:.4f}" + (f" ± {err:.4f}" if isinstance(err, float) else ""))
        print(f"{task:<20} {'  '.join(shown)}")
    return 0
