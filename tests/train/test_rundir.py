"""RunDir: the run directory's layout round-trips, checkpoints are found and written atomically,
and metrics read back what was written."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from torch import nn

import moelab.checkpoint_io
from moelab.config import ConfigError
from moelab.data import TokenDataset
from moelab.data.tokenizer import file_sha256
from moelab.rundir import RunDir
from moelab.train import CheckpointError, RunConfig
from run_fixtures import tiny_config


def _model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2))


def _saved(tmp_path: Path, steps: list[int], keep_last: int = 10) -> RunDir:
    run = RunDir(tmp_path / "run")
    for step in steps:
        run.save_checkpoint(step, _model(step), {"step": step}, keep_last=keep_last)
    return run


def test_layout_round_trip(tmp_path: Path, data_dir: Path) -> None:
    cfg = tiny_config(data_dir, train={"steps": 7})
    ds = TokenDataset(data_dir)
    run = RunDir(tmp_path / "run")
    assert not run.holds_run and not run.has_summary and not run.has_metrics
    with pytest.raises(ConfigError, match="is not a moelab run"):
        run.read_config(RunConfig)
    run.create(cfg, ds, {"total_params": 3}, replace=False)
    assert run.holds_run and run.read_config(RunConfig) == cfg
    assert run.raw_config()["train"]["steps"] == 7
    assert run.has_tokenizer and run.tokenizer_sha256() == file_sha256(ds.tokenizer_file)
    assert run.tokenizer().encode("the fox") == ds.tokenizer().encode("the fox")
    run.check_same_tokenizer(ds)  # the run's own data: accepted
    assert json.loads((run.path / RunDir.ACCOUNTING).read_text()) == {"total_params": 3}
    assert run.read_summary() == {}
    run.write_summary({"steps": 7, "final_val_loss": 1.5})
    assert run.has_summary and run.read_summary() == {"steps": 7, "final_val_loss": 1.5}
    run.metrics_writer().close()
    run.create(cfg, ds, {}, replace=True)  # replacing a run removes its files
    assert not run.has_summary and not run.has_metrics


def test_metrics_round_trip_and_truncation(tmp_path: Path) -> None:
    run = RunDir(tmp_path)
    assert run.read_metrics() == []
    records = [
        {"kind": "train", "step": 1, "loss": 2.5, "layers": {"0": {"tokens_per_expert": [1, 2]}}},
        {"kind": "train", "step": 2, "loss": 0.1 + 0.2},  # floats survive exactly
        {"kind": "eval", "step": 2, "val_loss": 3.0},
        {"kind": "train", "step": 3, "loss": 1.0},
    ]
    writer = run.metrics_writer()
    for r in records[:2]:
        writer.write(r)
    writer.close()
    writer = run.metrics_writer()  # appends (a resumed run continues the file)
    for r in records[2:]:
        writer.write(r)
    writer.close()
    assert run.has_metrics
    assert run.read_metrics() == records
    assert run.read_metrics("eval") == [records[2]]
    run.truncate_metrics(2)
    assert run.read_metrics() == records[:3]
    with open(run.path / RunDir.METRICS, "a") as f:
        f.write("{not json\n")
    with pytest.raises(ValueError, match=r"metrics\.jsonl:4: not valid JSON"):
        run.read_metrics()


def test_checkpoints_list_latest_and_find(tmp_path: Path) -> None:
    run = _saved(tmp_path, [1, 2, 3])
    assert [p.name for p in run.checkpoints()] == [f"step_0000000{i}" for i in (1, 2, 3)]
    assert run.has_latest and run.latest_checkpoint().name == "step_00000003"
    assert run.find_checkpoint(2).name == run.find_checkpoint("2").name == "step_00000002"
    assert run.find_checkpoint("step_00000001") == run.checkpoints()[0]
    assert run.find_checkpoint(str(run.checkpoints()[1])) == run.checkpoints()[1]
    with pytest.raises(CheckpointError, match="not found"):
        run.find_checkpoint(9)
    # `latest` missing (killed between committing a checkpoint and pointing at it): the newest
    (run.path / RunDir.CHECKPOINTS / RunDir.LATEST).unlink()
    assert not run.has_latest and run.latest_checkpoint().name == "step_00000003"
    (run.path / RunDir.CHECKPOINTS / RunDir.LATEST).write_text("step_00000009\n")
    with pytest.raises(CheckpointError, match="names checkpoint 'step_00000009'"):
        run.latest_checkpoint()
    with pytest.raises(CheckpointError, match="no checkpoint found"):
        RunDir(tmp_path / "empty").latest_checkpoint()


def test_without_latest_the_newest_complete_checkpoint_is_found(tmp_path: Path) -> None:
    """`latest` deleted in a run with several checkpoints: the newest complete `step_*` by step
    number (saved out of order, one past 8 digits), never the oldest, never a temporary or a
    `step_*` directory without its state or weights; and it is the one whose weights load."""
    steps = [5, 2, 99_999_999, 100_000_000, 7]
    run = _saved(tmp_path, steps)
    root = run.path / RunDir.CHECKPOINTS
    assert [RunDir.step_of(p) for p in run.checkpoints()] == sorted(steps)
    (root / RunDir.LATEST).unlink()
    newest = run.step_name(100_000_000)
    assert run.latest_checkpoint().name == run.find_checkpoint().name == newest
    (root / f"{RunDir.TMP_PREFIX}step_200000000-1").mkdir()  # a killed writer's leftovers
    (root / "step_300000000").mkdir()  # empty: not a checkpoint
    half = root / "step_400000000"
    half.mkdir()
    (half / RunDir.WEIGHTS).write_bytes((root / newest / RunDir.WEIGHTS).read_bytes())  # no state
    (root / "step_notanumber").mkdir()
    assert run.latest_checkpoint().name == newest
    model = _model(0)
    ckpt, state = run.load_checkpoint(model)
    assert ckpt.name == newest and state == {"step": 100_000_000}
    want = _model(100_000_000).state_dict()
    assert all(torch.equal(t, want[k]) for k, t in model.state_dict().items())
    for p in run.checkpoints()[::-1]:  # remove from the newest down: always the next newest
        if run.is_complete(p):
            assert run.latest_checkpoint() == p
            shutil.rmtree(p)
    with pytest.raises(CheckpointError, match="no checkpoint found"):
        run.latest_checkpoint()


def test_keep_last_and_load(tmp_path: Path) -> None:
    run = _saved(tmp_path, [1, 2, 3, 4], keep_last=2)
    assert [p.name for p in run.checkpoints()] == ["step_00000003", "step_00000004"]
    model = _model(0)
    ckpt, state = run.load_checkpoint(model)
    assert ckpt.name == "step_00000004" and state == {"step": 4}
    assert all(
        torch.equal(a, b)
        for a, b in zip(model.state_dict().values(), _model(4).state_dict().values(), strict=True)
    )
    assert run.load_weights(model, 3).name == "step_00000003"


def test_atomic_write_leaves_no_partial_files(tmp_path: Path, monkeypatch) -> None:
    run = _saved(tmp_path, [1])
    root = run.path / RunDir.CHECKPOINTS
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_00000001"]  # no temporaries

    def killed(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(moelab.checkpoint_io.torch, "save", killed)  # fails after the weights
    with pytest.raises(OSError, match="disk full"):
        run.save_checkpoint(2, _model(2), {"step": 2})
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_00000001"]
    assert run.latest_checkpoint().name == "step_00000001"
    monkeypatch.undo()
    # what a SIGKILLed writer leaves: ignored by every reader, removed by the next save
    partial = root / f"{RunDir.TMP_PREFIX}step_00000002-999"
    partial.mkdir()
    (partial / RunDir.WEIGHTS).write_bytes(b"\x00" * 10)
    assert [p.name for p in run.checkpoints()] == ["step_00000001"]
    assert run.latest_checkpoint().name == "step_00000001"
    run.save_checkpoint(2, _model(2), {"step": 2})
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_00000001", "step_00000002"]


def test_provenance_records_every_training_process(data_dir, tmp_path):
    from moelab import provenance
    from moelab.train import train

    cfg = tiny_config(data_dir)
    run = RunDir(tmp_path / "run")
    train(cfg, run.path, stop_after=2)
    train(cfg, run.path, resume=True)
    records = run.provenance()
    assert [r["start_step"] for r in records] == [0, 2]
    assert records[0]["torch"] == records[1]["torch"] and records[0]["data_sha256"]
    assert records[0]["data_sha256"] == provenance.data_checksum(data_dir)
    assert not provenance.differences({"a": records[0], "b": records[1]})
