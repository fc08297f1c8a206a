"""Non-finite steps (train.on_nonfinite): never applied, never saved; ``stop`` ends the run with one
line naming the step and the last good checkpoint, ``skip`` goes on without the step's update;
metrics.jsonl and summary.json stay strict JSON."""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from moelab.cli import main
from moelab.config import ConfigError
from moelab.rundir import MetricsWriter, RunDir
from moelab.train import RunConfig, Trainer, train
from moelab.train.divergence import MAX_CONSECUTIVE_SKIPS, Diverged
from run_fixtures import REMOE, TINY, tiny_config


def strict(line: str) -> dict:
    """``json.loads`` as any other JSON reader: bare NaN / Infinity are errors."""

    def refuse(name: str) -> None:
        raise ValueError(f"not JSON: {name}")

    return json.loads(line, parse_constant=refuse)


def poison(monkeypatch: pytest.MonkeyPatch, steps: Iterable[int], where: str = "loss") -> None:
    """Make the steps ``steps`` non-finite: the logits become NaN (``loss``: NaN loss and
    gradients) or the head's gradient becomes infinite (``grad``: a finite loss)."""
    steps = set(steps)
    original = Trainer.accumulate_gradients

    def accumulate(self: Trainer, x: torch.Tensor, y: torch.Tensor) -> dict:
        if self.step + 1 not in steps:
            return original(self, x, y)
        if where == "loss":
            handle = self.model.lm_head.register_forward_hook(lambda m, i, out: out * math.nan)
        else:
            handle = self.model.lm_head.weight.register_hook(lambda g: g * math.inf)
        try:
            return original(self, x, y)
        finally:
            handle.remove()

    monkeypatch.setattr(Trainer, "accumulate_gradients", accumulate)


def weights(run: Path, step: int) -> dict[str, torch.Tensor]:
    return load_file(str(RunDir(run).find_checkpoint(step) / RunDir.WEIGHTS))


def test_stop_keeps_the_last_good_checkpoint_and_resumes_as_if_nothing_happened(
    tmp_path: Path, data_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = tiny_config(data_dir, train={"steps": 6}, checkpoint={"every": 2, "keep_last": 5})
    reference = tmp_path / "reference"
    train(cfg, reference)  # never poisoned
    run = tmp_path / "run"
    poison(monkeypatch, [5])
    with pytest.raises(Diverged, match=r"^step 5: loss nan, gradient norm nan: training stopped"):
        train(cfg, run)
    message = str(pytest.raises(Diverged, train, cfg, tmp_path / "again").value)
    assert "\n" not in message and "step_00000004" in message
    rundir = RunDir(run)
    assert [p.name for p in rundir.checkpoints()] == ["step_00000002", "step_00000004"]
    assert rundir.latest_checkpoint().name == "step_00000004" and not rundir.has_summary
    assert all(torch.isfinite(t).all() for t in weights(run, 4).values())
    lines = (run / RunDir.METRICS).read_text().splitlines()
    last = strict(lines[-1])  # every line is strict JSON, the bad step's too
    assert [strict(line)["step"] for line in lines] == [1, 2, 3, 4, 5]
    assert last["loss"] == "NaN" and last["nonfinite"] is True
    assert math.isnan(rundir.read_metrics()[-1]["loss"])  # moelab's reader gives the float back
    assert not (run / ".lock").exists()

    monkeypatch.undo()
    train(cfg, run, resume=True)
    keys = ("step", "loss", "grad_norm", "lr")
    ours = [{k: r[k] for k in keys} for r in rundir.read_metrics("train")]
    theirs = [{k: r[k] for k in keys} for r in RunDir(reference).read_metrics("train")]
    assert ours == theirs  # step 5's failure changed nothing that was kept
    for name, t in weights(reference, 6).items():
        assert torch.equal(weights(run, 6)[name], t), name


def test_an_infinite_gradient_norm_stops_the_cli_with_one_line(
    tmp_path: Path,
    data_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture,
) -> None:
    poison(monkeypatch, [3], where="grad")
    run = tmp_path / "run"
    args = ["train", "--preset", "dense-tiny", "--run-dir", str(run), *TINY]
    args += [f"data.path={data_dir}", "train.steps=4", "checkpoint.every=2"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("moelab: error: step 3: loss ")
    assert "gradient norm inf" in err and "step_00000002" in err
    assert [p.name for p in RunDir(run).checkpoints()] == ["step_00000002"]


def test_skip_makes_no_update_and_goes_on(
    tmp_path: Path,
    data_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture,
) -> None:
    cfg = tiny_config(
        data_dir,
        REMOE,
        train={"steps": 5, "on_nonfinite": "skip"},
        checkpoint={"every": 1, "keep_last": 10},
    )
    poison(monkeypatch, [3])
    run = tmp_path / "run"
    summary = train(cfg, run)
    err = capsys.readouterr().err  # one warning line, above the progress bar
    assert "warning: RuntimeWarning: step 3: loss nan, gradient norm nan; skipped" in err
    assert summary["steps"] == 5 and summary["skipped_steps"] == 1
    assert json.loads((run / RunDir.SUMMARY).read_text())["skipped_steps"] == 1
    records = RunDir(run).read_metrics("train")
    assert [r.get("skipped", False) for r in records] == [False, False, True, False, False]
    assert records[2]["lambda_next"] == records[1]["lambda_next"]  # λ saw nothing of step 3
    assert records[3]["lr"] != records[2]["lr"]  # the schedule counts the skipped step
    before, after = weights(run, 2), weights(run, 3)
    assert all(torch.equal(before[k], after[k]) for k in before)  # no update at step 3
    assert not torch.equal(weights(run, 4)["lm_head.weight"], after["lm_head.weight"])
    state = [
        torch.load(RunDir(run).find_checkpoint(s) / RunDir.STATE, weights_only=True) for s in (2, 3)
    ]
    moments = [s["optimizer"]["state"] for s in state]
    for key, st in moments[0].items():  # Adam's moments and step count untouched
        for name, value in st.items():
            assert torch.equal(value, moments[1][key][name]), (key, name)
    assert state[0]["sampler"] != state[1]["sampler"]  # the bad batch is not seen again


def test_skip_gives_up_after_too_many_in_a_row(
    tmp_path: Path, data_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    steps = MAX_CONSECUTIVE_SKIPS + 4
    cfg = tiny_config(data_dir, train={"steps": steps, "on_nonfinite": "skip"})
    poison(monkeypatch, range(2, steps + 1))
    last = 1 + MAX_CONSECUTIVE_SKIPS
    with pytest.raises(Diverged, match=rf"^step {last}: .* {MAX_CONSECUTIVE_SKIPS} steps in a row"):
        train(cfg, tmp_path / "run")
    assert RunDir(tmp_path / "run").checkpoints() == []  # checkpoint.every=0: none was due


def test_on_nonfinite_is_validated() -> None:
    raw = tiny_config(Path("data")).to_dict()
    raw["train"]["on_nonfinite"] = "ignore"
    with pytest.raises(ConfigError, match="train.on_nonfinite: must be one of 'stop', 'skip'"):
        RunConfig.from_dict(raw)


def test_metrics_and_summary_are_strict_json(tmp_path: Path) -> None:
    run = RunDir(tmp_path)
    writer = run.metrics_writer()
    assert isinstance(writer, MetricsWriter)
    writer.write({"kind": "train", "step": 1, "loss": math.nan, "aux": {"z": math.inf}})
    writer.write({"kind": "eval", "step": 1, "val_ppl": -math.inf, "by": [1.0, math.nan]})
    writer.close()
    with open(tmp_path / RunDir.METRICS, "a") as f:  # a line written before this rule
        f.write('{"kind": "train", "step": 2, "loss": NaN}\n')
    lines = (tmp_path / RunDir.METRICS).read_text().splitlines()
    assert strict(lines[0]) == {"kind": "train", "step": 1, "loss": "NaN", "aux": {"z": "Infinity"}}
    assert strict(lines[1])["val_ppl"] == "-Infinity"
    got = run.read_metrics()
    assert math.isnan(got[0]["loss"]) and got[0]["aux"]["z"] == math.inf
    assert got[1]["val_ppl"] == -math.inf and math.isnan(got[1]["by"][1])
    assert math.isnan(got[2]["loss"])
    run.write_summary({"final_val_loss": math.inf, "method": "dense"})
    assert strict((tmp_path / RunDir.SUMMARY).read_text())["final_val_loss"] == "Infinity"
    assert run.read_summary() == {"final_val_loss": math.inf, "method": "dense"}
