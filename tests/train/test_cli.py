"""``moelab train`` / ``demo`` end to end through the CLI on a tiny config."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from moelab.cli import main
from moelab.rundir import RunDir
from run_fixtures import TINY


def test_train_resume_and_print_config(
    tmp_path: Path, data_dir: Path, capsys: pytest.CaptureFixture
) -> None:
    run = tmp_path / "run"
    args = [
        "train",
        "--preset",
        "topk-tiny",
        *TINY,
        f"data.path={data_dir}",
        "--set",
        "train.steps=2",
        "--run-dir",
        str(run),
    ]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "unigram entropy" in out and "val loss" in out and "MFLOPs/token" in out
    summary = json.loads((run / "summary.json").read_text())
    assert summary["method"] == "topk" and summary["steps"] == 2
    assert main(["train", "--resume", str(run), "train.steps=3"]) == 0  # extend the run
    assert [r["step"] for r in RunDir(run).read_metrics("train")] == [1, 2, 3]
    assert json.loads((run / "summary.json").read_text())["steps"] == 3
    assert main(["train", "--preset", "dense-tiny", "--print-config"]) == 0
    assert '"flops_per_token"' in capsys.readouterr().out
    assert main(["train", "--list-presets"]) == 0
    assert "remoe-tiny" in capsys.readouterr().out.split()


def test_demo_command(tmp_path: Path, data_dir: Path, capsys: pytest.CaptureFixture) -> None:
    run = tmp_path / "demo"
    args = ["demo", *TINY, f"data.path={data_dir}", "train.steps=2", "--run-dir", str(run)]
    assert main(args) == 0
    assert main(args) == 0  # a second demo replaces the first
    out = capsys.readouterr().out
    assert "--- generate 'def main('" in out and (run / "summary.json").is_file()


@pytest.mark.slow
def test_default_preset_learns(tmp_path: Path) -> None:
    """`moelab train` with no arguments: validation loss well below the unigram entropy (~2 min)."""
    run = tmp_path / "run"
    assert main(["train", "--run-dir", str(run), "logging.progress=false"]) == 0
    summary = json.loads((run / "summary.json").read_text())
    assert summary["method"] == "remoe" and summary["steps"] == 300
    assert summary["final_val_loss"] < summary["unigram_entropy"]["val"] - 1.0
    assert abs(summary["final_sparsity"] - summary["sparsity_target"]) < 0.05
