"""``moelab eval RUN_DIR``: validation loss and perplexity of a run, overall and per domain."""

from __future__ import annotations

import argparse
import json

from moelab.commands import add_checkpoint_option


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="validation loss / perplexity of a trained run")
    p.add_argument("run_dir", metavar="RUN_DIR")
    p.add_argument("--data", metavar="DIR", help="a prepared dataset (default: the run's own)")
    p.add_argument("--split", default="val", choices=["train", "val"])
    p.add_argument(
        "--max-batches",
        type=int,
        default=None,
        help="evaluate at most N batches (default: the whole split)",
    )
    p.add_argument("--batch-size", type=int, default=None, help="default: the run's eval batch")
    add_checkpoint_option(p)
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from moelab.train import evaluate_run

    result = evaluate_run(
        args.run_dir,
        data=args.data,
        split=args.split,
        max_batches=args.max_batches,
        batch_size=args.batch_size,
        checkpoint=args.checkpoint,
    )
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(f"run      {args.run_dir} ({result['checkpoint']})")
    print(f"data     {result['dataset']} [{args.split}], {result['tokens']:,} tokens")
    print(f"loss     {result['val_loss']:.4f}  ppl {result['val_ppl']:.2f}")
    for name, loss in result["val_loss_by_domain"].items():
        print(f"  {name:<10} {loss:.4f}  ({result['tokens_by_domain'][name]:,} tokens)")
    return 0
