"""Mistakes in configuration text end the command with one line that names the file or field and
the place, before any work starts (issue 18: these printed tracebacks, or for an empty run config
a weight-shape mismatch)."""

from __future__ import annotations

from pathlib import Path

import pytest

from moelab.cli import main

BROKEN = "model:\n  d_model: [64\n"  # an unclosed list


def _one_line_error(capsys: pytest.CaptureFixture, argv: list[str]) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("moelab: error: ") and err.count("\n") == 1, err
    return err.strip()


def _run(tmp_path: Path, config_text: str) -> Path:
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.yaml").write_text(config_text)
    return run


def test_yaml_syntax_error_in_config_file(tmp_path, capsys):
    path = tmp_path / "big.yaml"
    path.write_text(BROKEN)
    err = _one_line_error(capsys, ["train", "--config", str(path)])
    assert f"{path}: not valid YAML (" in err and "line 3, column 1" in err


@pytest.mark.parametrize("command", [["eval"], ["generate", "--prompt", "hi"], ["export-hf"]])
def test_yaml_syntax_error_in_a_runs_config(tmp_path, capsys, command):
    run = _run(tmp_path, BROKEN)
    argv = [command[0], str(run), *command[1:]]
    if command[0] == "export-hf":
        argv.append(str(tmp_path / "out"))
    err = _one_line_error(capsys, argv)
    assert f"{run / 'config.yaml'}: not valid YAML" in err


@pytest.mark.parametrize("text", ["", "\n# nothing but a comment\n"])
def test_an_empty_run_config_says_so(tmp_path, capsys, text):
    run = _run(tmp_path, text)
    err = _one_line_error(capsys, ["eval", str(run)])
    assert err.endswith(f"{run / 'config.yaml'}: the file is empty (no configuration in it)")


def test_unparsable_override_value(capsys):
    err = _one_line_error(
        capsys, ["train", "--preset", "topk-tiny", "model.ffn.router_options.p=[0.4"]
    )
    assert err.startswith("moelab: error: model.ffn.router_options.p: could not parse '[0.4'")
