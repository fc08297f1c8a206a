"""What training prints: validation lines, plain log lines off a terminal, warnings as one line,
and commands that can be typed as printed."""

from __future__ import annotations

import io
import os
import sys
import warnings
from pathlib import Path

import pytest

from moelab.commands.train import moelab_command
from moelab.train import Trainer, train
from moelab.train.metrics import Progress
from run_fixtures import REMOE, tiny_config


class FakeTerminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_plain_lines_and_validation_lines_off_a_terminal(
    tmp_path: Path, data_dir: Path, capsys: pytest.CaptureFixture
) -> None:
    """Issue #13: stdout is not a TTY (a log file): one plain line per log_every steps, not a bar
    redrawn with carriage returns; every validation pass is printed."""
    cfg = tiny_config(
        data_dir,
        ffn=REMOE,
        train={"steps": 4, "eval_every": 2},
        logging={"progress": True, "log_every": 2},
    )
    train(cfg, tmp_path / "run")
    captured = capsys.readouterr()
    assert "\r" not in captured.out + captured.err
    lines = captured.out.splitlines()
    progress = [
        line for line in lines if line.startswith("step 2/4") or line.startswith("step 4/4")
    ]
    assert len(progress) == 2, lines
    for key in ("loss ", "tokens/s ", "sparsity ", "λ "):
        assert key in progress[0], progress[0]
    evals = [line for line in lines if ": val loss " in line]
    assert [line.split(":")[0] for line in evals] == ["step 2", "step 4"]
    assert "(ppl " in evals[0] and "prose " in evals[0] and "code " in evals[0]


def test_each_step_logged_up_to_log_each_step_until(tmp_path: Path, data_dir: Path) -> None:
    """The first steps' dynamics (ReMoE's stage I) need every step: lines at steps 1-3 (every
    step up to 3), then every log_every = 4 steps, and the last step."""
    import json

    cfg = tiny_config(
        data_dir,
        train={"steps": 10, "eval_every": 0},
        logging={"progress": False, "log_every": 4, "log_each_step_until": 3},
    )
    train(cfg, tmp_path / "run")
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    steps = [r["step"] for r in map(json.loads, lines) if r.get("kind", "train") == "train"]
    assert steps == [1, 2, 3, 4, 8, 10], steps


def test_progress_off_prints_nothing(
    tmp_path: Path, data_dir: Path, capsys: pytest.CaptureFixture
) -> None:
    train(tiny_config(data_dir, train={"steps": 2, "eval_every": 1}), tmp_path / "run")
    assert capsys.readouterr().out == ""


def test_bar_on_a_terminal_with_lines_above_it() -> None:
    term = FakeTerminal()
    progress = Progress(3, 0, True, "remoe", log_every=1, stream=term)
    assert not progress.plain
    for step in (1, 2, 3):
        progress.update({"step": step, "loss": 5.0, "tokens_per_s": 100.0, "sparsity": 0.5})
        if step == 2:
            progress.show_eval(
                {"step": 2, "val_loss": 4.5, "val_ppl": 90.0, "val_loss_by_domain": {"a": 4.5}}
            )
    progress.close()
    text = term.getvalue()
    assert "\r" in text and "3/3" in text  # the bar
    assert "step 2: val loss 4.5000 (ppl 90.0); a 4.500\n" in text
    assert "step 1/3" not in text  # no plain lines on a terminal


def test_warnings_during_training_are_one_line(
    tmp_path: Path, data_dir: Path, capsys: pytest.CaptureFixture
) -> None:
    """Issue #13: e.g. ReMoE's collapse RuntimeWarning: one clean line on stderr (no source line
    echoed, nothing written into the bar), and Python's own warning display is restored after."""
    trainer = Trainer(tiny_config(data_dir, train={"steps": 2}), tmp_path / "run")
    step = trainer.train_step

    def step_with_warning():
        record = step()
        warnings.warn("layer(s) [1] have collapsed\nto 100% sparsity", RuntimeWarning, stacklevel=1)
        return record

    trainer.train_step = step_with_warning
    shown_before = warnings.showwarning
    trainer.run()
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if "RuntimeWarning" in line]
    assert lines and lines[0] == (
        "warning: RuntimeWarning: layer(s) [1] have collapsed to 100% sparsity"
    )
    assert "warnings.warn" not in err and "to 100% sparsity\n" in err
    assert warnings.showwarning is shown_before


def test_moelab_command_is_what_works_in_this_shell(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue #13: after `make demo` moelab is .venv/bin/moelab, not on PATH: print that."""
    bin_dir = tmp_path / ".venv" / "bin"
    bin_dir.mkdir(parents=True)
    monkeypatch.setattr(sys, "executable", str(bin_dir / "python"))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PATH", "/usr/bin:/bin")
    assert moelab_command() == f"{bin_dir / 'python'} -m moelab"  # no console script
    script = bin_dir / "moelab"
    script.write_text("#!/bin/sh\n")
    script.chmod(0o755)
    assert moelab_command() == os.path.join(".venv", "bin", "moelab")
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    assert moelab_command() == str(script)  # outside the directory: the absolute path
    monkeypatch.setenv("PATH", f"{bin_dir}:/usr/bin:/bin")
    assert moelab_command() == "moelab"  # on PATH: the plain name


def test_demo_hint_uses_the_working_command(
    tmp_path: Path, data_dir: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    from test_cli import TINY

    from moelab.cli import main

    script = tmp_path / ".venv" / "bin" / "moelab"  # what `make demo` leaves, not on PATH
    script.parent.mkdir(parents=True)
    script.write_text("#!/bin/sh\n")
    script.chmod(0o755)
    monkeypatch.setattr(sys, "executable", str(script.parent / "python"))
    monkeypatch.setenv("PATH", "/usr/bin:/bin")
    monkeypatch.chdir(tmp_path)
    args = ["demo", *TINY, f"data.path={data_dir}", "train.steps=1", "--run-dir", "runs/demo"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "    .venv/bin/moelab eval runs/demo\n" in out
    assert "    .venv/bin/moelab generate runs/demo " in out
