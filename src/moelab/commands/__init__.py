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
