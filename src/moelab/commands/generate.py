"""``moelab generate RUN_DIR --prompt TEXT``: sample a continuation with the KV cache."""

from __future__ import annotations

import argparse

from moelab.commands import add_checkpoint_option
from moelab.commands._decoding import add_decoding_options, decoding_options
from moelab.serve.options import add_offload_arguments, check_read_workers


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="generate text from a trained run")
    p.add_argument("run_dir", metavar="RUN_DIR")
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--seed", type=int, default=0)
    add_decoding_options(p, mode=True)
    add_checkpoint_option(p)
    add_offload_arguments(p)  # --expert-memory, --expert-policy, --prefetch, --tier, ...
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from moelab.eval import generate_text
    from moelab.train import load_run, run_tokenizer

    session = None
    if args.expert_memory is None and (args.miss_precision or args.miss_threshold is not None):
        raise ValueError("--miss-precision/--miss-threshold: need --expert-memory")
    if args.miss_threshold is not None and args.miss_precision is None:
        raise ValueError("--miss-threshold: needs --miss-precision (int8 or int4)")
    if args.read_workers is not None:
        if args.expert_memory is None:
            raise ValueError("--read-workers: needs --expert-memory")
        check_read_workers(args.read_workers, "--read-workers")
    if args.expert_memory is not None:  # experts served from the checkpoint file (moelab.serve)
        from moelab.serve import load_offloaded

        model, config, session = load_offloaded(
            args.run_dir,
            args.expert_memory,
            policy=args.expert_policy,
            prefetch=args.prefetch,
            tier_name=args.tier,
            checkpoint=args.checkpoint,
            miss_precision=args.miss_precision,
            **({} if args.miss_threshold is None else {"miss_threshold": args.miss_threshold}),
            **({} if args.read_workers is None else {"read_workers": args.read_workers}),
        )
    else:
        model, config = load_run(args.run_dir, checkpoint=args.checkpoint)
    if config.train.threads is not None:
        import torch

        torch.set_num_threads(config.train.threads)
    text = generate_text(
        model,
        run_tokenizer(args.run_dir),
        args.prompt,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        seed=args.seed,
        decoding=args.decoding,
        decoding_options=decoding_options(args),
    )
    print(args.prompt + text)
    if session is not None:
        from moelab.serve import print_stats

        print_stats(session.stats())
        session.close()
    return 0
