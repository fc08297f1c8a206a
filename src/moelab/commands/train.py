"""``moelab train``: train a preset or YAML config (plus dotted overrides) into a run directory.

Under ``torchrun`` (``torchrun --nproc_per_node N -m moelab train ...``) every process runs this
command; rank 0 alone prints, and a failure on any rank ends them all (``run_guarded``).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

from moelab.commands import add_override_options, config_overrides


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train",
        help="train a model from a preset or config file (default preset: remoe-tiny)",
        description="Train a model. With no arguments trains the default preset (remoe-tiny) on "
        "the embedded corpus. Overrides are dotted key=value pairs, e.g. train.steps=100 "
        "model.ffn.top_k=2.",
    )
    src = p.add_mutually_exclusive_group()
    src.add_argument("--preset", help="a shipped preset (see --list-presets)")
    src.add_argument("--config", metavar="FILE.yaml", help="a run config file")
    src.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR")
    add_override_options(p, "dotted config overrides")
    p.add_argument("--run-dir", help="output directory (default: runs/<preset>-<timestamp>)")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an existing run in --run-dir (only its files; a directory holding "
        "anything else is refused)",
    )
    p.add_argument("--list-presets", action="store_true", help="print the presets and exit")
    p.add_argument(
        "--print-config",
        action="store_true",
        help="print the resolved config and its parameter/FLOP counts, then exit",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from moelab.distributed import run_guarded

    return run_guarded(lambda: _run(args))


def _run(args: argparse.Namespace) -> int:
    from moelab.config import dump_yaml
    from moelab.model import accounting
    from moelab.train import (
        DEFAULT_PRESET,
        Trainer,
        check_trainable,
        list_presets,
        load_run_config,
        resolve_run_config,
    )

    if args.list_presets:
        for name in list_presets():
            print(name)
        return 0
    overrides = config_overrides(args)
    if args.resume:
        if args.run_dir and Path(args.run_dir) != Path(args.resume):
            raise ValueError("--run-dir: not used with --resume (the run continues in RUN_DIR)")
        config = load_run_config(args.resume).with_overrides(overrides)
        run_dir, preset = Path(args.resume), None
    else:
        preset = None if args.config else (args.preset or DEFAULT_PRESET)
        config = resolve_run_config(preset=preset, config_file=args.config, overrides=overrides)
        name = preset or Path(args.config).stem
        run_dir = Path(args.run_dir or default_run_dir(name, config.distributed.timeout_s))
    if args.print_config:
        print(dump_yaml(config), end="")
        acc = accounting(config.model)
        print(json.dumps({k: acc[k] for k in ("total_params", "active_params", "flops_per_token")}))
        return 0
    check_trainable(config)
    trainer = Trainer(
        config, run_dir, resume=bool(args.resume), overwrite=args.overwrite, preset=preset
    )
    main = trainer.parallel.is_main  # under torchrun only rank 0 prints
    if trainer.complete:
        if main:
            print(
                f"run        {run_dir} is complete ({trainer.step} of {config.train.steps} "
                "steps); nothing changed. To train it further, raise train.steps, e.g. "
                f"{moelab_command()} train --resume {run_dir} train.steps={2 * trainer.step}"
            )
        trainer.close()
        return 0
    return 130 if run_and_report(trainer, run_dir) is None else 0


def default_run_dir(name: str, timeout_s: float) -> str:
    """``runs/<name>-<time>``, from rank 0's clock on every rank of a ``torchrun`` launch (ranks
    that start in different seconds would otherwise write different directories)."""
    from moelab.distributed import rank0_choice

    return rank0_choice(f"runs/{name}-{time.strftime('%Y%m%d-%H%M%S')}", timeout_s)


def run_and_report(trainer, run_dir: Path) -> dict | None:  # noqa: ANN001 - a Trainer
    """Train with the start and end lines printed (by rank 0 under torchrun); None (after saying
    how to continue) when the run was interrupted, else its summary."""
    main = trainer.parallel.is_main
    if main:
        print_start(trainer)
    summary = trainer.run()
    trainer.close()
    if summary.get("interrupted"):
        if main:
            print(f"continue with: {resume_command(trainer)} {run_dir}")
        return None
    if main:
        print_summary(summary, run_dir)
    return summary


def resume_command(trainer) -> str:  # noqa: ANN001 - a moelab.train.Trainer
    """The command that continues the run (under torchrun: with the same number of processes)."""
    if trainer.parallel.distributed:
        n = trainer.parallel.world_size
        return f"torchrun --nproc_per_node {n} -m moelab train --resume"
    return f"{moelab_command()} train --resume"


def moelab_command() -> str:
    """How to type ``moelab`` in this shell: ``moelab`` when it is on PATH, else the console
    script beside the running interpreter (``.venv/bin/moelab`` after ``make demo``, relative when
    under the current directory), else ``python -m moelab``."""
    script = Path(sys.executable).parent / "moelab"
    if not script.is_file():
        return f"{sys.executable} -m moelab"
    on_path = shutil.which("moelab")
    if on_path and os.path.samefile(on_path, script):
        return "moelab"
    try:
        return str(script.relative_to(Path.cwd()))  # holds a slash: runs as a path
    except ValueError:
        return str(script)


def print_start(trainer) -> None:  # noqa: ANN001 - a moelab.train.Trainer
    cfg, acc = trainer.config, trainer.accounting
    d = cfg.data
    ent = trainer.dataset.meta.get("unigram_entropy_nats", {})
    action = f"resuming at step {trainer.step}" if trainer.step else "new run"
    print(f"run        {trainer.run_dir} ({action})")
    print(
        f"method     {cfg.method}: {acc['total_params']:,} params, {acc['active_params']:,} "
        f"active, {acc['flops_per_token'] / 1e6:.2f} MFLOPs/token (forward, nominal)"
    )
    print(
        f"data       {trainer.dataset.path}  unigram entropy train {ent.get('train', 0):.3f} / "
        f"val {ent.get('val', 0):.3f} nats/token"
    )
    micro = "" if trainer.parallel.distributed else f" ({d.accumulation_steps} micro-batches)"
    print(
        f"schedule   {cfg.train.steps} steps x {d.batch_size} x {d.seq_len} tokens{micro}, "
        f"lr {cfg.optim.lr:g} -> "
        f"{cfg.optim.lr * cfg.optim.min_lr_ratio:g}, device {trainer.device}"
        f"{' bf16' if trainer.bf16 else ''}"
    )
    if trainer.parallel.distributed:
        local = d.batch_size // trainer.parallel.world_size
        micro = trainer.parallel.micro_batches(d.batch_size, d.micro_batch_size)
        print(
            f"parallel   {trainer.parallel.describe()}: {local} sequences per rank per step "
            f"({micro} micro-batches)"
        )


def print_summary(summary: dict, run_dir: Path) -> None:
    from moelab.rundir import RunDir

    ent = (summary.get("unigram_entropy") or {}).get("val")
    by_dom = ", ".join(f"{k} {v:.3f}" for k, v in summary["val_loss_by_domain"].items())
    print(
        f"done       {summary['steps']} steps, {summary['tokens']:,} tokens in "
        f"{summary['wall_time_s']:.0f} s ({summary['tokens_per_s']:,.0f} tokens/s)"
    )
    line = f"val loss   {summary['final_val_loss']:.3f} (ppl {summary['final_val_ppl']:.1f})"
    if ent:
        line += f" vs unigram entropy {ent:.3f}"
    print(f"{line}; by domain: {by_dom}")
    measured = (summary.get("params") or {}).get("measured_flops_per_token")
    if measured is not None:  # what the routers really ran (docs/training.md)
        print(f"compute    {measured / 1e6:.2f} MFLOPs/token measured (forward)")
    print(f"saved      {run_dir}/ ({RunDir.SUMMARY}, {RunDir.METRICS}, {RunDir.CHECKPOINTS}/)")
