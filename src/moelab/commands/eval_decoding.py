"""``moelab eval-decoding RUN_DIR``: how well each decoding mode (plain, SCMoE, test-time
rerouting) predicts the true continuations of validation windows
(:mod:`moelab.eval.continuation`)."""

from __future__ import annotations

import argparse
import json

from moelab.commands import add_checkpoint_option
from moelab.commands._decoding import add_decoding_options, decoding_options


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "eval-decoding", help="continuation loss / accuracy of each MoE-aware decoding mode"
    )
    p.add_argument("run_dir", metavar="RUN_DIR")
    p.add_argument("--decodings", default="plain,scmoe,reroute", help="comma-separated modes")
    p.add_argument("--prompt-len", type=int, default=64, help="prompt tokens per window (64)")
    p.add_argument("--continuation", type=int, default=32, help="scored tokens per window (32)")
    p.add_argument("--batch-size", type=int, default=8, help="windows per batch (8)")
    p.add_argument("--max-batches", type=int, default=4, help="batches of the split (4)")
    p.add_argument("--split", default="val", choices=["train", "val"])
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (1)")
    add_decoding_options(p)
    add_checkpoint_option(p)
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import time

    import torch

    from moelab.data.dataset import iter_eval_batches
    from moelab.eval.continuation import continuation_scores
    from moelab.eval.decoding import make_decoder
    from moelab.train import load_run
    from moelab.train.setup import open_dataset

    for name in ("prompt_len", "continuation", "batch_size", "max_batches", "threads"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    model, config = load_run(args.run_dir, checkpoint=args.checkpoint)
    length = args.prompt_len + args.continuation
    if length > model.cfg.max_seq_len:
        limit = model.cfg.max_seq_len
        raise ValueError(f"--prompt-len + --continuation ({length}) exceeds max_seq_len ({limit})")
    modes = [m.strip() for m in args.decodings.split(",") if m.strip()]
    options = decoding_options(args)
    for mode in modes:  # every mode and option checked before any work
        make_decoder(model, mode, **options).remove()
    torch.set_num_threads(args.threads)
    dataset = open_dataset(config)
    # windows of length + 1 tokens: iter_eval_batches splits them into inputs and targets
    batches = list(
        iter_eval_batches(dataset, args.split, length - 1, args.batch_size, args.max_batches)
    )
    windows = [torch.cat([b["input_ids"], b["targets"][:, -1:]], dim=1) for b in batches]
    results = {}
    for mode in modes:
        start = time.perf_counter()
        scores = continuation_scores(
            lambda mode=mode: make_decoder(model, mode, **options), windows, args.prompt_len
        )
        results[mode] = scores | {"seconds": time.perf_counter() - start}
    if args.json:
        print(json.dumps({"options": options, "results": results}, indent=2))
        return 0
    print(
        f"run {args.run_dir}, {args.split} split: {len(windows)} batches of {args.batch_size} "
        f"windows, prompt {args.prompt_len}, {args.continuation} scored tokens each"
    )
    print(f"{'decoding':<9} {'nll':>7} {'accuracy':>8} {'outside':>7} {'tokens':>7} {'s':>6}")
    for mode, r in results.items():
        print(
            f"{mode:<9} {r['nll']:>7.4f} {r['accuracy']:>8.4f} {r['outside']:>7.4f} "
            f"{int(r['tokens']):>7} {r['seconds']:>6.1f}"
        )
    return 0
