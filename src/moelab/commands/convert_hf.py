"""``moelab convert-hf HF_DIR RUN_DIR``: a local transformers MoE checkpoint as a moelab run."""

from __future__ import annotations

import argparse

from moelab.commands import add_new_run_options, print_new_run
from moelab.layers.routers import routers_with


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "convert-hf",
        help="convert a local transformers checkpoint (Mixtral, OLMoE, Qwen2/3-MoE, Llama) "
        "into a moelab run, optionally switched to another router (ReMoE's ReLU routing, ...)",
        description="Convert a local transformers checkpoint directory into a moelab run "
        "directory whose step-0 checkpoint holds its weights; continue with "
        "`moelab train --resume RUN_DIR`. Overrides (KEY=VALUE) set data/optim/train/logging/"
        "checkpoint fields, e.g. train.steps=1000 optim.lr=1e-4.",
    )
    p.add_argument("hf_dir", metavar="HF_DIR")
    p.add_argument("run_dir", metavar="RUN_DIR")
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
    add_new_run_options(p, "RUN_DIR")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from moelab.hf.runs import convert_checkpoint
    from moelab.rundir import RunDir

    # before loading the checkpoint: never HF_DIR itself, a dataset or a folder of other files
    RunDir(args.run_dir).check_new_run_from(
        args.hf_dir, overwrite=args.overwrite, field="RUN_DIR", source_field="HF_DIR"
    )
    ckpt = convert_checkpoint(
        args.hf_dir,
        args.run_dir,
        data=args.data,
        router=args.router,
        overrides=[*args.overrides, *args.set_overrides],
        overwrite=args.overwrite,
    )
    print_new_run("converted", args.hf_dir, args.run_dir, ckpt.name)
    return 0
