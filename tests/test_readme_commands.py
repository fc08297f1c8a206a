"""The README runs as written (issue 18 item 11, issue 19 "A lean README").

Default suite: the block reader, every command checked with moelab's and torchrun's own parsers
(config keys, files read, layout), the checker failing on broken commands, the cheap commands and
the Python blocks run on a small fresh run, the size limit, and the headline numbers found in the
results file they are copied from. ``-m slow``: every shell command of the README run in order, as
a subprocess, in an empty directory, with training steps capped.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import moelab
from readme_commands import (
    README,
    ROOT,
    Block,
    Command,
    ReadmeError,
    check_commands,
    inputs_outputs,
    parse_moelab,
    python_blocks,
    readme_commands,
    shell_commands,
)
from run_fixtures import TINY, make_dataset, one_torch_thread  # noqa: F401

TEXT = README.read_text("utf-8")
COMMANDS = readme_commands(TEXT)
MAX_BYTES = 15_000  # "15 KB": decimal, as the guide reads it


def test_readme_is_at_most_15_kb():
    size = len(README.read_bytes())
    assert size <= MAX_BYTES, f"README.md is {size:,} bytes; move detail into docs/"


def test_block_reader_joins_continuations_keeps_quoted_lines_and_drops_comments():
    body = (
        "# a comment line\n"
        ".venv/bin/moelab train --preset topk-tiny \\\n"
        "    train.steps=5   # trailing comment\n"
        "\n"
        '.venv/bin/python -c "\n'
        "import sys  # kept: inside the quotes\n"
        'print(1)"\n'
        'FOO="a b" make golden\n'
    )
    cmds = shell_commands(Block("bash", 10, body))
    assert [c.words for c in cmds] == [
        [".venv/bin/moelab", "train", "--preset", "topk-tiny", "train.steps=5"],
        [".venv/bin/python", "-c", "\nimport sys  # kept: inside the quotes\nprint(1)"],
        ["make", "golden"],
    ]
    assert [c.line for c in cmds] == [12, 15, 18]
    assert cmds[2].env == {"FOO": "a b"}
    assert readme_commands("```python\nx = 1\n```\n```bash\nmake test\n```\n")[0].words == [
        "make",
        "test",
    ]


def test_readme_has_a_command_block_per_capability():
    programs = {c.words[1] for c in COMMANDS if c.program == "moelab"}
    needed = {"train", "data", "eval", "generate", "analyze", "report", "compare", "export-hf"}
    needed |= {"upcycle", "lm-eval", "compress", "bench"}
    assert needed <= programs, needed - programs
    assert any(c.program == "torchrun" for c in COMMANDS)
    assert any(c.words[:2] == ["make", "demo"] for c in COMMANDS)
    assert any(c.words[:2] == ["make", "test"] for c in COMMANDS)


def test_every_readme_command_parses_and_reads_only_what_exists():
    done = check_commands(COMMANDS)
    assert len(done) == len(COMMANDS) > 20


def test_every_command_of_the_cli_tour_parses_and_reads_only_what_exists():
    """docs/cli.md holds the README's longer forms: checked the same way (not run)."""
    cmds = readme_commands((ROOT / "docs" / "cli.md").read_text("utf-8"), "docs/cli.md")
    assert len(check_commands(cmds)) == len(cmds) > 20


def test_inline_moelab_commands_parse():
    """Commands quoted in prose (`moelab convert-hf HF_DIR RUN_DIR --router relu`) parse too."""
    spans = re.findall(
        r"`((?:\.venv/bin/)?moelab [^`]+)`", re.sub(r"```.*?```", "", TEXT, flags=re.S)
    )
    assert spans
    for span in spans:
        cmd = Command(shlex.split(span.removeprefix(".venv/bin/")), 0, span)
        parse_moelab(cmd.words[1:], cmd)


@pytest.mark.parametrize(
    "line, message",
    [
        (".venv/bin/moelab evaluate runs/demo", "invalid choice"),
        (".venv/bin/moelab eval runs/demo --max-batch-size 4", "unrecognized arguments"),
        (".venv/bin/moelab train --preset topk-tiny model.ffn.routr=hash", "routr"),
        (".venv/bin/moelab train --preset huge-tiny", "unknown preset"),
        (".venv/bin/moelab train --config big.yaml", "does not exist"),
        (".venv/bin/moelab eval runs/demo --data data/my_corpus", "data/my_corpus"),
        (".venv/bin/moelab train --resume runs/never", "runs/never"),
        ("torchrun --nproc_per_node 2 -m moelab train --run-dir runs/x", "nothing else is on"),
        (".venv/bin/torchrun --nproc_per_node 2 -m moelab train --preset topk-tiny", "--run-dir"),
        (".venv/bin/torchrun --nproc_per_node 3 -m moelab train --run-dir runs/x", "divisible"),
        (".venv/bin/pip install -e '.[nope]'", "no extra 'nope'"),
        ("make deploy", "no Makefile target"),
    ],
)
def test_checker_fails_on_a_command_that_would_not_run(line, message):
    cmds = readme_commands(f"```bash\n{line}\n```\n")
    with pytest.raises(ReadmeError, match=re.escape(message)):
        check_commands(cmds)


def _slug(heading: str) -> str:
    """GitHub's anchor of a Markdown heading."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def test_readme_links_point_at_files_and_headings_that_exist():
    for target in re.findall(r"\]\(([^)#\s]+)(?:#([^)\s]+))?\)", TEXT):
        path, anchor = target
        if "://" in path:
            continue
        assert (ROOT / path).exists(), f"README links {path}, which does not exist"
        if anchor:
            headings = re.findall(r"^#+ (.+)$", (ROOT / path).read_text("utf-8"), re.M)
            assert anchor in {_slug(h) for h in headings}, f"no heading #{anchor} in {path}"


def test_headline_numbers_are_copied_from_the_file_they_name():
    section = TEXT[TEXT.index("## Headline results") :]
    section = section[: section.index("\n## ", 1)]
    source = re.search(r"\]\((docs/results/[^)]+\.md)\)", section).group(1)
    data = (ROOT / source).read_text("utf-8")
    rows = [line for line in section.splitlines() if line.startswith("|")]
    numbers = re.findall(r"\d+\.\d+(?: ± \d+\.\d+)?M?", "\n".join(rows))
    assert len(numbers) >= 8
    missing = [n for n in numbers if n not in data]
    assert not missing, f"not in {source}: {missing}"


# --- the cheap commands and the Python blocks, run on a small fresh run -------------------------

CHEAP = {"eval", "generate", "analyze", "prune", "compress"}


def _is_cheap(cmd: Command) -> bool:
    if cmd.program != "moelab":
        return False
    w = cmd.words[1:]
    return (
        w[0] in CHEAP
        or w[:2] in (["data", "prepare"], ["data", "info"])
        or (w[0] == "train" and ("--print-config" in w or "--list-presets" in w))
        or w[:2] == ["compare", "--list"]
    )


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """An empty directory like a fresh clone after `make demo`, with the clone's `docs` and
    `examples` (README commands read them) and a small `runs/demo`: the demo's preset shrunk to one
    d_model=32 block on the tests' tiny dataset, so that evaluating it takes a moment."""
    from moelab.cli import main

    d = tmp_path_factory.mktemp("clone")
    for name in ("docs", "examples"):
        (d / name).symlink_to(ROOT / name)
    data = make_dataset(tmp_path_factory.mktemp("tiny_data"))
    old = Path.cwd()
    os.chdir(d)
    try:
        assert (
            main(["demo", *TINY, f"data.path={data}", "train.steps=4", "train.eval_every=0"]) == 0
        )
    finally:
        os.chdir(old)
    return d


def test_cheap_readme_commands_run(workdir, monkeypatch, capsys):
    from moelab.cli import main

    monkeypatch.chdir(workdir)
    ran = []
    for cmd in COMMANDS:
        if not _is_cheap(cmd):
            continue
        ins, _ = inputs_outputs(parse_moelab(cmd.words[1:], cmd))
        if not all(Path(p).exists() for p in ins):  # made by a training line: the slow test
            continue
        code = main(cmd.words[1:])
        out = capsys.readouterr()
        assert code == 0, f"{cmd.where()}\nexit {code}\n{out.err[-2000:]}"
        ran.append(cmd.words[1])
    assert {"eval", "generate", "analyze", "data", "train", "compress"} <= set(ran), ran


@pytest.mark.parametrize("index", range(len(python_blocks(TEXT))))
def test_python_blocks_run(workdir, monkeypatch, index):
    block = python_blocks(TEXT)[index]
    monkeypatch.chdir(workdir)
    exec(compile(block.body, f"README.md:{block.line}", "exec"), {"__name__": "readme"})


# --- every shell command, in order, as a subprocess --------------------------------------------


def _capped(cmd: Command) -> list[str] | None:
    """The command to run for ``cmd`` (None: skip it), with training capped to a few steps."""
    py = sys.executable
    w = list(cmd.words)
    if cmd.program == "make":
        return [py, "-m", "moelab", "demo", *_caps(w, positional=True)] if w[1] == "demo" else None
    if cmd.program in ("pip", "pytest"):
        return None  # installs happen outside the test; the suite does not run itself
    if cmd.program == "python":
        return [py, *w[1:]]
    head = [py, "-m", "torch.distributed.run"] if cmd.program == "torchrun" else [py, "-m"]
    rest = w[1:] if cmd.program == "torchrun" else ["moelab", *w[1:]]
    sub = rest[rest.index("moelab") + 1]
    if sub == "lm-eval" and importlib.util.find_spec("lm_eval") is None:
        return None
    if sub in ("train", "prune", "compress", "upcycle", "convert-hf"):
        rest += _caps(w, positional=False)
    elif sub == "demo":
        rest += _caps(w, positional=True)
    elif sub == "compare" and "--suite" in rest:
        steps = int(rest[rest.index("--steps") + 1]) if "--steps" in rest else 250
        rest = [a for i, a in enumerate(rest) if "--steps" not in (a, rest[i - 1] if i else "")]
        rest += ["--steps", str(min(steps, 4)), "--max-batches", "2"]
        rest += [] if "--seeds" in rest else ["--seeds", "0"]
    return [*head, *rest]


def _caps(words: list[str], positional: bool) -> list[str]:
    asked = [int(a.split("=")[1]) for a in words if a.startswith("train.steps=")]
    steps = min(asked[-1], 3 + asked[-1] // 50) if asked else 3
    caps = [f"train.steps={steps}", "train.eval_every=0", "data.eval_max_batches=2"]
    return caps if positional else [x for c in caps for x in ("--set", c)]


def test_the_slow_runner_caps_training_and_keeps_the_rest():
    def run(line):
        argv = _capped(readme_commands(f"```bash\n{line}\n```\n")[0])
        return None if argv is None else " ".join(argv[1:])

    caps = "--set train.eval_every=0 --set data.eval_max_batches=2"
    assert run(".venv/bin/moelab compare --suite routers --steps 20 --jobs 2") == (
        "-m moelab compare --suite routers --jobs 2 --steps 4 --max-batches 2 --seeds 0"
    )
    assert run(".venv/bin/moelab train --resume runs/x train.steps=200").endswith(
        f"train.steps=200 --set train.steps=7 {caps}"
    )
    assert run("make demo").startswith("-m moelab demo train.steps=3")
    assert run("make test") is None and run(".venv/bin/pip install -e '.[hf]'") is None
    assert run(".venv/bin/torchrun --nproc_per_node 2 -m moelab eval runs/x") == (
        "-m torch.distributed.run --nproc_per_node 2 -m moelab eval runs/x"
    )


@pytest.mark.slow
def test_every_readme_command_runs_in_order(tmp_path):
    for name in ("docs", "examples"):
        shutil.copytree(ROOT / name, tmp_path / name, symlinks=False)
    src = str(Path(moelab.__file__).resolve().parents[1])  # the moelab under test
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([src, os.environ.get("PYTHONPATH", "")]))
    for cmd in COMMANDS:
        argv = _capped(cmd)
        if argv is None:
            continue
        proc = subprocess.run(
            argv, cwd=tmp_path, env={**env, **cmd.env}, capture_output=True, text=True, timeout=900
        )
        assert proc.returncode == 0, f"{cmd.where()}\n{' '.join(argv)}\n{proc.stderr[-3000:]}"
