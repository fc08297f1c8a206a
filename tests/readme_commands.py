"""Reading the README's code blocks as commands, and checking them without running them.

Used by ``tests/test_readme_commands.py``. A README command that does not exist, has a wrong flag,
a wrong config key, reads a file nothing made, or names an extra or a Makefile target that is not
there, fails here, with the line it was written on. What is checked without running:

* ``.venv/bin/moelab ...``: moelab's own argparse parser; for commands that take config overrides,
  the overrides against the run config (and ``--config FILE``); the paths it reads must exist in
  the clone, be ``runs/demo`` (what ``make demo`` makes) or be written by an earlier README line.
* ``.venv/bin/torchrun ... -m moelab ...``: torch's own torchrun parser, then the moelab part as
  above, plus the parallel layout (``check_layout``) for the number of processes; a new run must
  name ``--run-dir`` (every rank must agree on it).
* ``make TARGET``: a target of the Makefile; ``.venv/bin/pip install -e '.[X]'``: an extra of
  pyproject.toml; ``.venv/bin/python -c CODE``: compiles; ``.venv/bin/pytest``: the marker exists.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import io
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
VENV = ".venv/bin/"
PROGRAMS = ("moelab", "torchrun", "python", "pip", "pytest")
MADE_BY_MAKE_DEMO = ("runs/demo",)


@dataclass
class Command:
    """One shell command of a README block: ``words`` as the shell splits them (comments gone)."""

    words: list[str]
    line: int  # 1-based line of the README where it starts
    text: str
    env: dict[str, str] = field(default_factory=dict)
    source: str = "README.md"

    @property
    def program(self) -> str:
        first = self.words[0]
        return first[len(VENV) :] if first.startswith(VENV) else first

    def where(self) -> str:
        return f"{self.source}:{self.line}: {self.text.strip()}"


@dataclass
class Block:
    lang: str
    line: int  # line of the opening fence
    body: str


def code_blocks(text: str) -> list[Block]:
    """Every fenced block (```lang ... ```), in order."""
    blocks, lines, i = [], text.splitlines(), 0
    while i < len(lines):
        m = re.match(r"^```(\w*)\s*$", lines[i])
        if not m:
            i += 1
            continue
        start, body = i + 1, []
        i += 1
        while i < len(lines) and lines[i].rstrip() != "```":
            body.append(lines[i])
            i += 1
        blocks.append(Block(m.group(1), start, "\n".join(body)))
        i += 1
    return blocks


def shell_commands(block: Block, source: str = "README.md") -> list[Command]:
    """The commands of a ``bash`` block: backslash continuations joined, a quoted argument that
    spans lines (``python -c "..."``) kept whole, ``# comments`` dropped, ``VAR=value`` prefixes
    taken as the environment."""
    out: list[Command] = []
    pending, start = "", 0
    for offset, raw in enumerate(block.body.splitlines()):
        if not pending:
            start = block.line + 1 + offset
            if not raw.strip() or raw.lstrip().startswith("#"):
                continue
        pending = f"{pending}\n{raw}" if pending else raw
        if pending.endswith("\\"):
            pending = pending[:-1]
            continue
        try:
            words = shlex.split(pending, comments=True)
        except ValueError:  # an open quote: the argument goes on on the next line
            continue
        env = {}
        while words and re.match(r"^[A-Z_][A-Z0-9_]*=", words[0]):
            key, value = words.pop(0).split("=", 1)
            env[key] = value
        if words:
            out.append(Command(words, start, pending, env, source))
        pending = ""
    if pending:
        raise ValueError(f"{source}:{start}: unterminated command {pending!r}")
    return out


def readme_commands(text: str, source: str = "README.md") -> list[Command]:
    """The shell commands of every ``bash`` block of a Markdown text, in order."""
    blocks = [b for b in code_blocks(text) if b.lang in ("bash", "sh")]
    return [c for b in blocks for c in shell_commands(b, source)]


def python_blocks(text: str) -> list[Block]:
    return [b for b in code_blocks(text) if b.lang == "python"]


class ReadmeError(AssertionError):
    """A README command that would not run as written."""


@functools.lru_cache(maxsize=1)
def moelab_parser() -> argparse.ArgumentParser:
    from moelab.cli import build_parser

    return build_parser()


def parse_moelab(argv: list[str], cmd: Command) -> argparse.Namespace:
    """``argv`` through the ``moelab`` parser; ReadmeError with argparse's message on failure."""
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            args = moelab_parser().parse_args(argv)
    except SystemExit as exc:
        raise ReadmeError(f"{cmd.where()}\n  {err.getvalue().strip()}") from exc
    if not getattr(args, "func", None):
        raise ReadmeError(f"{cmd.where()}\n  no moelab command given")
    return args


def parse_torchrun(argv: list[str], cmd: Command) -> tuple[argparse.Namespace, list[str]]:
    """torchrun's own parser; returns its namespace and the moelab arguments after ``-m moelab``."""
    from torch.distributed.run import get_args_parser

    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            args = get_args_parser().parse_args(argv)
    except SystemExit as exc:
        raise ReadmeError(f"{cmd.where()}\n  {err.getvalue().strip()}") from exc
    if not (args.module and args.training_script == "moelab"):
        raise ReadmeError(f"{cmd.where()}\n  torchrun must start `-m moelab`")
    return args, list(args.training_script_args)


def overrides_of(args: argparse.Namespace) -> list[str]:
    return [*getattr(args, "overrides", []), *getattr(args, "set_overrides", [])]


def inputs_outputs(args: argparse.Namespace) -> tuple[list[str], list[str]]:
    """The paths a parsed moelab command reads and the ones it writes."""
    c, sub = args.command, getattr(args, "data_command", None)
    ins: list[str] = []
    outs: list[str] = []
    if c == "train":
        ins += [args.resume] if args.resume else []
        outs += [args.run_dir] if args.run_dir and not args.print_config else []
    elif c in ("eval", "generate", "export-hf"):
        ins.append(args.run_dir)
        outs += [args.out_dir] if c == "export-hf" else []
    elif c in ("prune", "compress", "upcycle", "convert-hf"):  # they make a run from weights
        ins.append(args.source)
        outs.append(args.output)
    elif c == "analyze":
        ins.append(args.run)
    elif c == "report":
        ins += args.runs
        outs.append(args.out)
    elif c == "lm-eval":
        ins.append(args.path)
    elif c == "compare" and args.suite:
        outs.append(args.out or f"runs/{args.suite}")
    elif c == "demo":
        outs.append(args.run_dir)
    elif c == "data" and sub == "prepare":
        ins += args.inputs
        outs.append(args.output)
    elif c == "data" and sub == "info":
        ins.append(args.path)
    for key in ("data", "dataset"):  # eval --data, convert-hf --data, analyze/report --dataset
        if isinstance(getattr(args, key, None), str):
            ins.append(getattr(args, key))
    for o in overrides_of(args):
        if o.startswith("data.path=") and o.split("=", 1)[1] not in ("null", "None", ""):
            ins.append(o.split("=", 1)[1])
    return ins, outs


def check_config(args: argparse.Namespace, cmd: Command, world: int | None = None) -> None:
    """The overrides (and ``--config FILE``) of a command resolve to a valid run config; under
    torchrun, its parallel layout suits ``world`` processes."""
    from moelab.train import resolve_run_config

    if args.command not in ("train", "demo", "prune", "compress", "upcycle", "convert-hf"):
        return
    config_file = getattr(args, "config", None)
    preset = None if config_file else (getattr(args, "preset", None) or None)
    overrides = overrides_of(args)
    if args.command != "train" or args.resume:  # a run's own model: only the other sections
        overrides = [o for o in overrides if not o.startswith("model.")]
    try:
        cfg = resolve_run_config(
            preset=preset,
            config_file=ROOT / config_file if config_file else None,
            overrides=overrides,
        )
        if world is not None and not (args.command == "train" and args.resume):
            from moelab.distributed.launch import LaunchEnv, check_layout

            check_layout(cfg, LaunchEnv(0, world, 0, world), cuda_devices=0)
    except ValueError as err:
        raise ReadmeError(f"{cmd.where()}\n  {err}") from err


def norm(path: str) -> str:
    return Path(path).as_posix().rstrip("/")


def check_commands(commands: list[Command], root: Path = ROOT) -> list[str]:
    """Every command checked without running it, in README order; returns one line per command
    saying what was checked (the test prints them), raises ReadmeError on the first problem."""
    made = set(MADE_BY_MAKE_DEMO)
    done = []
    for cmd in commands:
        prog = cmd.program
        if prog == "make":
            targets = re.findall(r"^([\w-]+):", (root / "Makefile").read_text(), re.M)
            for t in cmd.words[1:]:
                if t not in targets:
                    raise ReadmeError(f"{cmd.where()}\n  no Makefile target {t!r}")
            made.update(MADE_BY_MAKE_DEMO if "demo" in cmd.words[1:] else ())
            done.append(f"make target: {cmd.text}")
            continue
        if not cmd.words[0].startswith(VENV) or prog not in PROGRAMS:
            raise ReadmeError(
                f"{cmd.where()}\n  start commands with {VENV}<one of {', '.join(PROGRAMS)}> or "
                "make: nothing else is on PATH on a fresh clone"
            )
        if prog == "pip":
            extras = re.findall(r"\.\[([\w,]+)\]", " ".join(cmd.words))
            text = (root / "pyproject.toml").read_text()
            for extra in ",".join(extras).split(","):
                if extra and not re.search(rf"^{extra} = \[", text, re.M):
                    raise ReadmeError(f"{cmd.where()}\n  no extra {extra!r} in pyproject.toml")
            done.append(f"extras: {cmd.text}")
            continue
        if prog == "python":
            if cmd.words[1:2] != ["-c"]:
                raise ReadmeError(f"{cmd.where()}\n  only `python -c CODE` is checked")
            compile(cmd.words[2], cmd.where(), "exec")
            made.update(re.findall(r"'([\w.-]+(?:/[\w.-]+)+)'", cmd.words[2]))  # paths it writes
            done.append(f"compiles: {cmd.text}")
            continue
        if prog == "pytest":
            marks = re.findall(r"-m\s+(\w+)", cmd.text)
            if any(m not in (root / "pyproject.toml").read_text() for m in marks):
                raise ReadmeError(f"{cmd.where()}\n  unknown marker {marks}")
            done.append(f"pytest: {cmd.text}")
            continue
        world = None
        argv = cmd.words[1:]
        if prog == "torchrun":
            targs, argv = parse_torchrun(argv, cmd)
            nodes = int(str(targs.nnodes).split(":")[-1])
            world = nodes * int(targs.nproc_per_node)
        args = parse_moelab(argv, cmd)
        if world is not None and args.command == "train" and not args.resume and not args.run_dir:
            raise ReadmeError(f"{cmd.where()}\n  name --run-dir: every rank must write one run")
        check_config(args, cmd, world)
        ins, outs = inputs_outputs(args)
        for path in ins:
            if norm(path) not in made and not (root / path).exists():
                raise ReadmeError(
                    f"{cmd.where()}\n  reads {path!r}, which neither the clone, `make demo` nor "
                    "an earlier README command makes"
                )
        made.update(norm(p) for p in outs)
        done.append(f"parsed: {cmd.text}")
    return done
