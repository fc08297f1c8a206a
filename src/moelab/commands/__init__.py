"""Sub-commands of the ``moelab`` CLI, one module each (see :mod:`moelab.cli`), and the options
several of them share."""

from __future__ import annotations

import argparse


def add_override_options(p: argparse.ArgumentParser, positional_help: str) -> None:
    """Dotted config overrides: positional ``KEY=VALUE`` words and a repeatable ``--set``; the
    command reads ``[*args.overrides, *args.set_overrides]``."""
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help=positional_help)
    p.add_argument(
        "--set",
        dest="set_overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a dotted override (repeatable)",
    )


def add_new_run_options(p: argparse.ArgumentParser, run_dir_metavar: str) -> None:
    """What every command that writes a new run directory from weights (``convert-hf``,
    ``upcycle``, ``prune``) takes besides its inputs: config overrides and ``--overwrite``."""
    add_override_options(
        p, "dotted config overrides (right after the directories; anywhere else use --set)"
    )
    p.add_argument("--overwrite", action="store_true", help=f"replace a run in {run_dir_metavar}")


def print_new_run(verb: str, source: str, run_dir: str, checkpoint_name: str) -> None:
    """The two closing lines of those commands: what was written, and how to continue."""
    print(f"{verb} {source} into {run_dir} ({checkpoint_name})")
    print(f"continue training with: moelab train --resume {run_dir}")
