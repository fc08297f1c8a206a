"""``moelab upcycle RUN_DIR OUT_RUN_DIR``: a dense run's FFNs copied into experts (docs/hf.md)."""

from __future__ import annotations

import argparse

from moelab.commands import (
    add_new_run_parser,
    check_new_run_args,
    config_overrides,
    print_new_run,
)
from moelab.layers.routers import routers_with


def register(sub: argparse._SubParsersAction) -> None:
    add_new_run_parser(
        sub,
        "upcycle",
        source="RUN_DIR",
        output="OUT_RUN_DIR",
        help="turn a dense run into an MoE run whose experts start as copies of its FFNs",
        description="Sparse upcycling: each FFN of the dense run becomes NUM_EXPERTS copies "
        "(split into GRANULARITY fine-grained experts) with a new router. The new run starts "
        "at step 0 with those weights; continue with `moelab train --resume OUT_RUN_DIR`. "
        "Overrides (KEY=VALUE) set data/optim/train/logging/checkpoint fields.",
        run=run,
        options=_options,
        from_run=True,
    )


def _options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--num-experts", type=int, required=True, help="E, copies of each FFN")
    p.add_argument("--top-k", type=int, required=True, help="k, copies routed per token")
    p.add_argument("--granularity", type=int, default=1, help="G: split each copy into G experts")
    p.add_argument(
        "--noise-std", type=float, default=0.0, help="N(0, s^2) noise added to each copy"
    )
    p.add_argument(
        "--router",
        choices=routers_with("upcyclable"),
        default="topk",
        help="the new router (default topk, renormalised: the dense model at step 0)",
    )
    p.add_argument(
        "--no-renormalize",
        action="store_true",
        help="routers with renormalize (topk, ...): keep the raw softmax weights (the upcycled "
        "model then differs at step 0)",
    )


def run(args: argparse.Namespace) -> int:
    from moelab.hf.runs import upcycle_run

    # before any work: never the source run, a dataset or a folder of other files
    check_new_run_args(args)
    ckpt = upcycle_run(
        args.source,
        args.output,
        num_experts=args.num_experts,
        top_k=args.top_k,
        granularity=args.granularity,
        noise_std=args.noise_std,
        router=args.router,
        renormalize=not args.no_renormalize,
        checkpoint=args.checkpoint,
        overrides=config_overrides(args),
        overwrite=args.overwrite,
    )
    print_new_run("upcycled", args.source, args.output, ckpt.name)
    return 0
