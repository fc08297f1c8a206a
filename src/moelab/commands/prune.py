"""``moelab prune RUN_DIR OUT_RUN_DIR --keep N``: keep each MoE layer's N most-used experts."""

from __future__ import annotations

import argparse

from moelab.commands import (
    add_new_run_parser,
    check_new_run_args,
    config_overrides,
    print_new_run,
)


def register(sub: argparse._SubParsersAction) -> None:
    add_new_run_parser(
        sub,
        "prune",
        source="RUN_DIR",
        output="OUT_RUN_DIR",
        help="drop each MoE layer's least-used experts into a new run",
        description="Expert pruning by usage: count the tokens the routers send to each expert "
        "on validation batches of the run's data, keep each MoE layer's KEEP most-used experts "
        "(routed, fine-grained experts; a multiple of the granularity) and write them as a new "
        "run at step 0. Each router slices its own per-expert state; a router that cannot be "
        "pruned is refused. Exact where the router's gates do not depend on the dropped experts "
        "and those were never chosen (docs/routers.md); evaluate the new run, continue it with "
        "`moelab train --resume OUT_RUN_DIR`. Overrides (KEY=VALUE) set data/optim/train/"
        "logging/checkpoint fields.",
        run=run,
        options=_options,
        from_run=True,
    )


def _options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--keep", type=int, required=True, help="routed experts kept per MoE layer")
    p.add_argument(
        "--batches",
        type=int,
        default=16,
        help="validation batches that count expert usage (default 16)",
    )


def run(args: argparse.Namespace) -> int:
    from moelab.compress import prune_run

    if args.batches < 1:
        raise ValueError(f"--batches: must be a positive integer, got {args.batches}")
    # before the usage pass: never the source run, a dataset or a folder of other files
    check_new_run_args(args)
    ckpt, kept, usage = prune_run(
        args.source,
        args.output,
        keep=args.keep,
        batches=args.batches,
        checkpoint=args.checkpoint,
        overrides=config_overrides(args),
        overwrite=args.overwrite,
    )
    for block, ids in kept.items():
        counts = usage[block]
        share = float(counts[ids].sum()) / max(float(counts.sum()), 1.0)
        print(f"block {block}: kept {len(ids)} of {len(counts)} experts, {share:.1%} of routings")
    print_new_run("pruned", args.source, args.output, ckpt.name)
    return 0
