"""``moelab bench generate [RUN_DIR]``: moelab's generation speed against ``transformers``'
``generate`` on the same weights (the run exported with :mod:`moelab.hf`), in one process.

Wiring only: the measurement is :mod:`moelab.bench.generation`."""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from moelab.commands import add_checkpoint_option


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = (__doc__ or "").split("\n\n")[0]
    parser.add_argument("run_dir", metavar="RUN_DIR", help="a trained run")
    parser.add_argument("--batch", default="1,16", help="comma-separated batch sizes (1,16)")
    parser.add_argument("--tokens", type=int, default=100, help="new tokens per row (100)")
    parser.add_argument("--prompt-len", type=int, default=16, help="prompt tokens per row (16)")
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds (median of 5)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (1)")
    parser.add_argument(
        "--no-transformers", action="store_true", help="time moelab alone (no export)"
    )
    add_checkpoint_option(parser)


def batches_of(text: str) -> list[int]:
    try:
        batches = [int(b) for b in text.split(",")]
    except ValueError:
        batches = []
    if not batches or min(batches) < 1:
        raise ValueError(f"--batch must be comma-separated integers >= 1, got {text!r}")
    return batches


def run(args: argparse.Namespace) -> int:
    import torch

    from moelab.bench.generation import as_json, bench_generation, table
    from moelab.model import generate
    from moelab.train import load_run

    batches = batches_of(args.batch)
    for name in ("tokens", "prompt_len", "repeats", "threads"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    model, _ = load_run(args.run_dir, checkpoint=args.checkpoint)
    if args.prompt_len + args.tokens > model.cfg.max_seq_len:
        raise ValueError(
            f"--prompt-len + --tokens ({args.prompt_len + args.tokens}) exceeds the model's "
            f"max_seq_len ({model.cfg.max_seq_len})"
        )
    torch.set_num_threads(args.threads)

    def moelab_generate(ids, n):
        return generate(model, ids, n, temperature=0)

    fns = {"moelab": moelab_generate}
    with tempfile.TemporaryDirectory() as tmp:
        if not args.no_transformers:
            fns["transformers"] = transformers_generate(model, Path(tmp) / "hf")
        rows = bench_generation(
            fns, model.cfg.vocab_size, batches, args.tokens, args.prompt_len, args.repeats
        )
    print(
        f"threads {args.threads}, greedy, prompt {args.prompt_len} tokens, median of "
        f"{args.repeats} interleaved rounds; ratio = total tok/s over transformers'"
    )
    print(table(rows))
    if args.json:
        Path(args.json).write_text(json.dumps(as_json(rows), indent=2) + "\n")
    return 0


def transformers_generate(model, out: Path):
    """The run exported to ``out`` and loaded back by ``AutoModelForCausalLM``; its greedy
    ``generate`` with a fixed number of new tokens."""
    import torch
    import transformers

    from moelab.hf.export import export_model

    export_model(model, out)
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval()

    @torch.no_grad()
    def hf_generate(ids, n):
        return hf.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=n,
            min_new_tokens=n,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=0,
        )

    return hf_generate
