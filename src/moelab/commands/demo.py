"""``moelab demo``: train the default preset on the embedded corpus, evaluate it, generate text.

What ``make demo`` runs on a fresh clone: nothing is downloaded (the corpus and tokenizer ship in
the package), and the whole thing takes a few minutes on a laptop CPU. It replaces the run an
earlier demo left in ``--run-dir`` (and says so); a directory holding anything else is refused,
so it never removes a file that is not part of a run.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

PROMPTS = ("def main(", "The meaning of life is")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo",
        help="train the default preset end to end, evaluate it and generate a sample",
        description="Train the default preset (remoe-tiny) on the embedded corpus into "
        "--run-dir, then evaluate it and generate text. An earlier run in --run-dir is replaced "
        "(only a run's files are removed; a directory holding anything else is refused).",
    )
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted config overrides")
    p.add_argument("--preset", default=None, help="preset to train (default: remoe-tiny)")
    p.add_argument("--run-dir", default="runs/demo", help="output directory (default runs/demo)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from moelab.commands.train import moelab_command, run_and_report
    from moelab.eval import generate_text
    from moelab.rundir import RunDir
    from moelab.train import DEFAULT_PRESET, Trainer, resolve_run_config, run_tokenizer

    t0 = time.perf_counter()
    preset = args.preset or DEFAULT_PRESET
    config = resolve_run_config(preset=preset, overrides=args.overrides)
    run_dir = Path(args.run_dir)
    # a run is replaced; a dataset or other files are refused before anything is removed
    if RunDir(run_dir).check_new_run(overwrite=True, field="--run-dir"):
        print(f"demo: replacing the earlier run in {run_dir} (to keep it, give another --run-dir)")
    trainer = Trainer(config, run_dir, preset=preset, overwrite=True)
    if run_and_report(trainer, run_dir) is None:
        return 130
    model = trainer.model.eval()
    tok = run_tokenizer(run_dir)
    for prompt in PROMPTS:
        text = generate_text(model, tok, prompt, max_new_tokens=40, temperature=0.8, top_p=0.95)
        print(f"--- generate {prompt!r}\n{prompt}{text}")
    print(f"--- demo finished in {time.perf_counter() - t0:.0f} s; try:")
    moelab = moelab_command()  # `moelab` is not on PATH after `make demo`: .venv/bin/moelab
    print(f"    {moelab} eval {run_dir}")
    print(f"    {moelab} generate {run_dir} --prompt 'import ' --max-new-tokens 60")
    return 0
