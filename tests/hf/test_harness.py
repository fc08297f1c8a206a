"""``moelab lm-eval``: the local cloze task built from a held-out split runs through the lm-eval
package's model interface on a moelab run and on an export, and returns numbers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from moelab.cli import main
from moelab.hf.harness import build_cloze_task
from moelab.train import train
from run_fixtures import tiny_config

pytest.importorskip("lm_eval")


def test_cloze_task_is_deterministic_multiple_choice(tmp_path: Path, data_dir: Path) -> None:
    a = build_cloze_task(data_dir, tmp_path / "a", items=40, seed=0)
    b = build_cloze_task(data_dir, tmp_path / "b", items=40, seed=0)
    rows = [json.loads(line) for line in (a / "cloze.jsonl").read_text().splitlines()]
    assert (a / "cloze.jsonl").read_text() == (b / "cloze.jsonl").read_text()
    assert len(rows) == 40
    for row in rows:
        assert len(row["choices"]) == len(set(row["choices"])) == 4
        assert row["context"] and not row["context"].endswith(" ")
    assert "dataset_path: json" in (a / "moelab_cloze.yaml").read_text()
    with pytest.raises(ValueError, match="fewer than the 100000 items"):
        build_cloze_task(data_dir, tmp_path / "c", items=100000)


def test_lm_eval_runs_the_cloze_task_on_a_run_and_an_export(
    tmp_path: Path, data_dir: Path, capsys: pytest.CaptureFixture
) -> None:
    ffn = {"kind": "moe", "router": "relu", "num_experts": 4, "top_k": 1, "d_hidden": 32}
    run = tmp_path / "run"
    train(tiny_config(data_dir, ffn, train={"steps": 2, "eval_every": 0}), run)
    capsys.readouterr()
    before = sorted(p.relative_to(run) for p in run.rglob("*"))
    assert main(["lm-eval", str(run), "--items", "30", "--json"]) == 0
    ours = json.loads(capsys.readouterr().out)["moelab_cloze"]
    assert 0.0 <= ours["acc"] <= 1.0 and 0.0 <= ours["acc_norm"] <= 1.0
    assert sorted(p.relative_to(run) for p in run.rglob("*")) == before  # the run is a source

    pytest.importorskip("transformers")
    assert main(["export-hf", str(run), str(tmp_path / "hf")]) == 0
    capsys.readouterr()
    args = ["lm-eval", str(tmp_path / "hf"), "--data", str(data_dir), "--items", "30", "--json"]
    assert main(args) == 0
    theirs = json.loads(capsys.readouterr().out)["moelab_cloze"]
    assert theirs["acc"] == pytest.approx(ours["acc"])  # lm-eval's hf model on the export
