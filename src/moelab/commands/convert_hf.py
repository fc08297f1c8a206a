"""``moelab convert-hf HF_DIR RUN_DIR``: a local transformers MoE checkpoint as a moelab run."""

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
        "convert-hf",
        source="HF_DIR",
        output="RUN_DIR",
        help="convert a local transformers checkpoint (Mixtral, OLMoE, Qwen2/3-MoE, Llama) "
        "into a moelab run, optionally switched to another router (ReMoE's ReLU routing, ...)",
        description="Convert a local transformers checkpoint directory into a moelab run "
        "directory whose step-0 checkpoint holds its weights; continue with "
        "`moelab train --resume RUN_DIR`. Overrides (KEY=VALUE) set data/optim/train/logging/"
        "checkpoint fields, e.g. train.steps=1000 optim.lr=1e-4.",
        run=run,
        options=_options,
    )


def _options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--data",
        metavar="DIR",
        help="a dataset prepared with the checkpoint's tokenizer "
        "(moelab data prepare ... --tokenizer HF_DIR)",
    )
    p.add_argument(
        "--router",
        choices=routers_with("convertible"),
        default=None,
        help="switch the checkpoint's TopK routing to this router, which takes over the gate "
        "(default: keep it, same outputs); relu: ReMoE's ReLU routing with target sparsity "
        "1 - k/E",
    )


def run(args: argparse.Namespace) -> int:
    from moelab.hf.runs import convert_checkpoint

    # before loading the checkpoint: never HF_DIR itself, a dataset or a folder of other files
    check_new_run_args(args)
    ckpt = convert_checkpoint(
        args.source,
        args.output,
        data=args.data,
        router=args.router,
        overrides=config_overrides(args),
        overwrite=args.overwrite,
    )
    print_new_run("converted", args.source, args.output, ckpt.name)
    return 0
