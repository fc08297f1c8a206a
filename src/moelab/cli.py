"""The ``moelab`` command line: a thin shell that parses, validates and calls library functions.

Each sub-command lives in its own module under :mod:`moelab.commands` and exposes
``register(subparsers)``, which adds its parser and sets ``func`` (called with the parsed args,
returning an exit code). New commands are picked up by adding a module there; nothing here changes.
"""

from __future__ import annotations

import argparse
import importlib
import os
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
        code = int(args.func(args) or 0)
        sys.stdout.flush()  # a closed pipe must fail here, inside the handler, not at exit
        return code
    except BrokenPipeError:  # the reader left (`moelab analyze --json | head`): stop quietly
        _discard_stdout()
        return 141  # 128 + SIGPIPE: what a shell reports for a writer whose pipe was closed
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except ValueError as err:  # configuration / input errors: one clear line, no traceback
        print(f"moelab: error: {err}", file=sys.stderr)
        return 2


def _discard_stdout() -> None:
    """Point stdout at /dev/null, so the interpreter's final flush of what is still buffered does
    not raise a second BrokenPipeError (and print a traceback) on the way out."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError, AttributeError):  # stdout is not a file (tests capture it)
        pass


if __name__ == "__main__":
    sys.exit(main())
