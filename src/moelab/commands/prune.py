"""``moelab prune RUN_DIR OUT_RUN_DIR --keep N``: keep each MoE layer's N most-used experts."""

from __future__ import annotations

import argparse

from moelab.commands import add_new_run_options, print_new_run


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "prune",
        help="drop each MoE layer's least-used experts into a new run",
        description="Expert pruning by usage: count the tokens the routers send to each expert "
        "on validation batches of the run's data, keep each MoE layer's KEEP most-used experts "
        "(routed, fine-grained experts; a multiple of the granularity) and write them as a new "
        "run at step 0. Each router slices its own per-expert state; a router that cannot be "
        "pruned is refused. Exact where the router's gates do not depend on the dropped experts "
        "and those were never chosen (docs/routers.md); evaluate the new run, continue it with "
        "`moelab train --resume OUT_RUN_DIR`. Overrides (KEY=VALUE) set data/optim/train/"
        "logging/checkpoint fields.",
    )
    p.add_argument("run_dir", metavar="RUN_DIR")
    p.add_argument("out_dir", metavar="OUT_RUN_DIR")
    p.add_argument("--keep", type=int, required=True, help="routed experts kept per MoE layer")
    p.add_argument(
        "--batches",
        type=int,
        default=16,
        help="validation batches that count expert usage (default 16)",
    )
    p.add_argument(
        "--checkpoint", default=None, help="step number or step_* name (default: latest)"
    )
    add_new_run_options(p, "OUT_RUN_DIR")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from moelab.compress import prune_run
    from moelab.rundir import RunDir

    if args.batches < 1:
        raise ValueError(f"--batches: must be a positive integer, got {args.batches}")
    # before the usage pass: never the source run, a dataset or a folder of other files
    RunDir(args.out_dir).check_new_run_from(args.run_dir, overwrite=args.overwrite)
    ckpt, kept, usage = prune_run(
        args.run_dir,
        args.out_dir,
        keep=args.keep,
        batches=args.batches,
        checkpoint=args.checkpoint,
        overrides=[*args.overrides, *args.set_overrides],
        overwrite=args.overwrite,
    )
    for block, ids in kept.items():
        counts = usage[block]
        share = float(counts[ids].sum()) / max(float(counts.sum()), 1.0)
        print(f"block {block}: kept {len(ids)} of {len(counts)} experts, {share:.1%} of routings")
    print_new_run("pruned", args.run_dir, args.out_dir, ckpt.name)
    return 0
