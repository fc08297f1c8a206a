"""The ``moelab`` command line: a thin shell that parses, validates and calls library functions.

Each sub-command lives in its own module under :mod:`moelab.commands` and exposes
``register(subparsers)``, which adds its parser and sets ``func`` (called with the parsed args,
returning an exit code). New commands are picked up by adding a module there; nothing here changes.
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys

import moelab
import moelab.commands
from moelab.runtime import keep_freed_memory


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="moelab",
        description="Build, train, evaluate and analyse sparse Mixture-of-Experts language models.",
    )
    parser.add_argument("--version", action="version", version=f"moelab {moelab.__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for info in sorted(pkgutil.iter_modules(moelab.commands.__path__), key=lambda m: m.name):
        if info.name.startswith("_"):
            continue
        module = importlib.import_module(f"moelab.commands.{info.name}")
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    keep_freed_memory()  # recycle large CPU buffers between steps (see moelab.runtime)
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except ValueError as err:  # configuration / input errors: one clear line, no traceback
        print(f"moelab: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
