"""Sub-commands of the ``moelab`` CLI, one module each (see :mod:`moelab.cli`), and the options
several of them share."""

from __future__ import annotations

import argparse
from collections.abc import Callable


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


def add_checkpoint_option(p: argparse.ArgumentParser) -> None:
    """``--checkpoint``: which of a run's checkpoints a command reads (default: the latest)."""
    p.add_argument(
        "--checkpoint", default=None, help="step number or step_* name (default: latest)"
    )


def add_new_run_parser(
    sub: argparse._SubParsersAction,
    name: str,
    *,
    source: str,
    output: str,
    help: str,
    description: str,
    run: Callable[[argparse.Namespace], int],
    options: Callable[[argparse.ArgumentParser], None] | None = None,
    from_run: bool = False,
) -> argparse.ArgumentParser:
    """The parser of a command that writes a new run directory from weights (``convert-hf``,
    ``upcycle``, ``prune``), so all of them take their shared arguments alike: the positional
    ``SOURCE OUTPUT`` pair (read back as ``args.source``, ``args.output``), the command's own
    ``options``, ``--checkpoint`` when the source is a run (``from_run``), then dotted config
    overrides (positional ``KEY=VALUE`` after the directories, or ``--set``) and ``--overwrite``.
    The metavars ``source`` and ``output`` are also the field names :func:`check_new_run_args`
    names in its errors."""
    p = sub.add_parser(name, help=help, description=description)
    p.add_argument("source", metavar=source)
    p.add_argument("output", metavar=output)
    if options is not None:
        options(p)
    if from_run:
        add_checkpoint_option(p)
    add_override_options(
        p, "dotted config overrides (right after the directories; anywhere else use --set)"
    )
    p.add_argument("--overwrite", action="store_true", help=f"replace a run in {output}")
    p.set_defaults(func=run, source_field=source, output_field=output)
    return p


def check_new_run_args(args: argparse.Namespace) -> None:
    """Before any work of a command built by :func:`add_new_run_parser`: its output may hold a
    run only with ``--overwrite``, and is never the source, inside it, a dataset or other files."""
    from moelab.rundir import RunDir

    RunDir(args.output).check_new_run_from(
        args.source,
        overwrite=args.overwrite,
        field=args.output_field,
        source_field=args.source_field,
    )


def config_overrides(args: argparse.Namespace) -> list[str]:
    """The dotted overrides of a command that took :func:`add_override_options`, in order."""
    return [*args.overrides, *args.set_overrides]


def print_new_run(
    verb: str, source: str, run_dir: str, checkpoint_name: str, untrainable: str | None = None
) -> None:
    """The two closing lines of those commands: what was written, and how to continue (or, for
    a model that cannot train, ``untrainable`` saying why, how to use it)."""
    print(f"{verb} {source} into {run_dir} ({checkpoint_name})")
    if untrainable is None:
        print(f"continue training with: moelab train --resume {run_dir}")
    else:
        print(f"evaluate with: moelab eval {run_dir} (not trainable: {untrainable})")
