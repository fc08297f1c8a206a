"""``--resume``: refused overrides leave the run untouched; a complete run is left as it is."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from moelab.cli import main
from moelab.rundir import RunDir
from moelab.train import CheckpointError, load_run, train
from run_fixtures import TINY, tiny_config


def snapshot(root: Path) -> dict[str, tuple[bytes, int]]:
    """Every file's bytes and every entry's mtime under ``root``: what "unchanged" means."""
    return {
        str(p.relative_to(root)): (p.read_bytes() if p.is_file() else b"", p.stat().st_mtime_ns)
        for p in sorted(root.rglob("*"))
    }


def train_topk(run: Path, data_dir: Path, steps: int = 2) -> None:
    args = [
        "train",
        "--preset",
        "topk-tiny",
        *TINY,
        f"data.path={data_dir}",
        f"train.steps={steps}",
    ]
    assert main([*args, "--run-dir", str(run)]) == 0


@pytest.mark.parametrize(
    "override,message",
    [
        ("model.ffn.num_experts=4", "model.ffn.num_experts (8 → 4): cannot change on resume"),
        ("model.d_model=64", "model.d_model (32 → 64): cannot change on resume"),
        ("model.ffn.router=relu", "model.ffn.router (topk → relu): cannot change on resume"),
        ("model.ffn.kind=dense", "model.ffn.kind (moe → dense): cannot change on resume"),
        ("model.n_heads=4", "model.n_heads (2 → 4): cannot change on resume"),
        ("data.seq_len=8", "data.seq_len: cannot change on resume (16 → 8)"),
        ("data.batch_size=4", "data.batch_size: cannot change on resume (2 → 4)"),
        ("data.seed=7", "data.seed: cannot change on resume (0 → 7)"),
    ],
)
def test_refused_resume_leaves_the_run_untouched(
    tmp_path: Path, data_dir: Path, capsys: pytest.CaptureFixture, override: str, message: str
) -> None:
    """Issue #9: a shape-changing override is refused in one line naming the field, before the
    run directory is touched, so eval and resume of the intact run still work."""
    run = tmp_path / "run"
    train_topk(run, data_dir, steps=2)
    (run / "checkpoints" / ".tmp-step_00000003-999").mkdir()  # removed only by a run that starts
    before = snapshot(run)
    capsys.readouterr()
    assert main(["train", "--resume", str(run), override, "train.steps=3"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"moelab: error: {message}") and "\n" not in err, err
    assert snapshot(run) == before
    assert main(["eval", str(run), "--max-batches", "1"]) == 0
    # an override that keeps the model's shapes is still allowed
    assert (
        main(["train", "--resume", str(run), "model.ffn.balance_coef=0.02", "train.steps=3"]) == 0
    )
    assert json.loads((run / "summary.json").read_text())["steps"] == 3


def test_lowering_steps_below_the_checkpoint_is_refused(
    tmp_path: Path, data_dir: Path, capsys: pytest.CaptureFixture
) -> None:
    run = tmp_path / "run"
    train_topk(run, data_dir, steps=3)
    before = snapshot(run)
    assert main(["train", "--resume", str(run), "train.steps=2"]) == 2
    assert "train.steps: the run is at step 3" in capsys.readouterr().err
    assert snapshot(run) == before


def test_weights_that_do_not_fit_the_config_are_one_line(tmp_path: Path, data_dir: Path) -> None:
    """A config.yaml edited by hand after training: the error names the tensor, not "corrupt"."""
    run = tmp_path / "run"
    train_topk(run, data_dir)
    config = run / "config.yaml"
    config.write_text(config.read_text().replace("num_experts: 8", "num_experts: 4"))
    with pytest.raises(CheckpointError) as err:
        load_run(run)
    text = str(err.value)
    assert "router.weight is [8, 32] in the checkpoint, [4, 32] in the model" in text
    assert "\n" not in text and "corrupt" not in text


def test_resuming_a_complete_run_changes_nothing(
    tmp_path: Path, data_dir: Path, capsys: pytest.CaptureFixture
) -> None:
    """Issue #10: no second validation line, no `tokens_per_s: 0`, no `preset: null`."""
    run = tmp_path / "run"
    train_topk(run, data_dir, steps=2)
    before = snapshot(run)
    capsys.readouterr()
    assert main(["train", "--resume", str(run)]) == 0
    assert "is complete (2 of 2 steps); nothing changed" in capsys.readouterr().out
    assert snapshot(run) == before
    # raising train.steps continues it, and the summary keeps the preset
    assert main(["train", "--resume", str(run), "train.steps=3"]) == 0
    summary = json.loads((run / "summary.json").read_text())
    assert (summary["preset"], summary["steps"]) == ("topk-tiny", 3)
    assert summary["tokens_per_s"] > 0
    assert [r["step"] for r in RunDir(run).read_metrics("eval")] == [2, 3]


def test_preset_survives_an_interrupted_run(tmp_path: Path, data_dir: Path) -> None:
    cfg = tiny_config(data_dir, train={"steps": 3})
    train(cfg, tmp_path / "run", preset="dense-tiny", stop_after=1)
    summary = train(cfg, tmp_path / "run", resume=True)  # as `moelab train --resume` calls it
    assert summary["preset"] == "dense-tiny"
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["preset"] == "dense-tiny"


def test_run_killed_before_its_summary_is_finished_once(tmp_path: Path, data_dir: Path) -> None:
    """Killed after the last checkpoint and the final validation, before the summary: resuming
    writes the summary from what was logged (no second validation line, no null train loss)."""
    run = tmp_path / "run"
    cfg = tiny_config(data_dir, train={"steps": 3})
    done = train(cfg, run)
    (run / "summary.json").unlink()
    metrics = (run / "metrics.jsonl").read_text()
    summary = train(cfg, run, resume=True)
    assert (run / "metrics.jsonl").read_text() == metrics
    for key in ("final_train_loss", "final_val_loss", "val_loss_by_domain", "steps", "tokens"):
        assert summary[key] == done[key], key
    assert summary["tokens_per_s"] > 0


def test_an_extended_run_stopped_early_is_not_reported_complete(
    tmp_path: Path, data_dir: Path
) -> None:
    """A finished run resumed with more steps and stopped before them has no summary: the old
    one described a shorter run, and suites (which keep runs with a summary) would report it."""
    run = tmp_path / "run"
    train(tiny_config(data_dir, train={"steps": 2}), run)
    assert RunDir(run).has_summary
    longer = tiny_config(data_dir, train={"steps": 5})
    out = train(longer, run, resume=True, stop_after=3)
    assert out["interrupted"] and not RunDir(run).has_summary
    assert train(longer, run, resume=True)["steps"] == 5 and RunDir(run).has_summary
