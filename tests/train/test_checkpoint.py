"""Checkpoints: atomic writes, keep-last-K, clear errors for corrupt files, exact resume."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest
import torch

from moelab.rundir import RunDir
from moelab.train import CheckpointError, Trainer, load_run, train
from run_fixtures import REMOE, tiny_config

COMPARED = ("step", "tokens", "lr", "loss", "aux", "grad_norm", "lambda", "sparsity", "layers")


def train_records(run_dir: Path) -> list[dict]:
    return [{k: r.get(k) for k in COMPARED} for r in RunDir(run_dir).read_metrics("train")]


def test_layout_latest_and_keep_last(tmp_path: Path, data_dir: Path) -> None:
    cfg = tiny_config(data_dir, train={"steps": 5}, checkpoint={"every": 1, "keep_last": 2})
    summary = train(cfg, tmp_path / "run")
    run = tmp_path / "run"
    names = [p.name for p in RunDir(run).checkpoints()]
    assert names == ["step_00000004", "step_00000005"]
    assert (run / "checkpoints" / "latest").read_text().strip() == "step_00000005"
    for f in ("config.yaml", "metrics.jsonl", "summary.json", "accounting.json", "tokenizer.json"):
        assert (run / f).is_file(), f
    assert {"model.safetensors", "state.pt"} <= {
        p.name for p in (run / "checkpoints" / "step_00000005").iterdir()
    }
    on_disk = json.loads((run / "summary.json").read_text())
    assert on_disk["steps"] == summary["steps"] == 5
    for key in (
        "method",
        "tokens",
        "wall_time_s",
        "tokens_per_s",
        "final_val_loss",
        "final_val_ppl",
        "val_loss_by_domain",
        "params",
        "unigram_entropy",
    ):
        assert key in on_disk, key
    model, run_cfg = load_run(run)
    assert run_cfg == cfg and not model.training
    model4, _ = load_run(run, checkpoint=4)
    assert not torch.equal(model.lm_head.weight, model4.lm_head.weight)


def test_partial_temp_dir_is_ignored_and_cleaned(tmp_path: Path, data_dir: Path) -> None:
    cfg = tiny_config(data_dir, train={"steps": 2})
    run = tmp_path / "run"
    train(cfg, run)
    partial = run / "checkpoints" / ".tmp-step_00000003-999"
    partial.mkdir()
    (partial / "model.safetensors").write_bytes(b"\x00" * 10)  # a killed writer's leftovers
    assert RunDir(run).latest_checkpoint().name == "step_00000002"
    assert [p.name for p in RunDir(run).checkpoints()] == ["step_00000002"]
    assert RunDir(run).clean_temporary() == [partial] and not partial.exists()
    # without `latest` (killed between the rename and the pointer update) the newest complete one
    (run / "checkpoints" / "latest").unlink()
    assert RunDir(run).latest_checkpoint().name == "step_00000002"


def test_truncated_weights_raise_naming_the_file(tmp_path: Path, data_dir: Path) -> None:
    run = tmp_path / "run"
    train(tiny_config(data_dir, train={"steps": 2}), run)
    weights = run / "checkpoints" / "step_00000002" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(CheckpointError, match=r"model\.safetensors: corrupt or truncated"):
        load_run(run)
    with pytest.raises(CheckpointError, match="model.safetensors"):
        Trainer(tiny_config(data_dir, train={"steps": 4}), run, resume=True)


def test_truncated_state_raises_naming_the_file(tmp_path: Path, data_dir: Path) -> None:
    run = tmp_path / "run"
    train(tiny_config(data_dir, train={"steps": 2}), run)
    state = run / "checkpoints" / "step_00000002" / "state.pt"
    state.write_bytes(state.read_bytes()[:100])
    with pytest.raises(CheckpointError, match=r"state\.pt: corrupt or truncated"):
        Trainer(tiny_config(data_dir, train={"steps": 4}), run, resume=True)
    (run / "checkpoints" / "latest").write_text("step_00000099\n")
    with pytest.raises(CheckpointError, match="names checkpoint 'step_00000099'"):
        load_run(run)


@pytest.mark.parametrize("micro", [None, 2], ids=["no-accum", "accum"])
def test_resume_reproduces_uninterrupted_metrics(tmp_path: Path, data_dir: Path, micro) -> None:
    """On CPU, 3 steps + a resumed 3 steps log exactly what 6 uninterrupted steps log."""
    cfg = tiny_config(
        data_dir,
        ffn=REMOE,
        train={"steps": 6, "eval_every": 2},
        data={"micro_batch_size": micro},
    )
    train(cfg, tmp_path / "full")
    first = train(cfg, tmp_path / "resumed", stop_after=3)
    resumed_run = RunDir(tmp_path / "resumed")
    assert first["interrupted"] and resumed_run.latest_checkpoint().name == "step_00000003"
    train(cfg, tmp_path / "resumed", resume=True)
    full, resumed = train_records(tmp_path / "full"), train_records(tmp_path / "resumed")
    assert [r["step"] for r in resumed] == [1, 2, 3, 4, 5, 6]
    assert resumed == full  # bit-identical losses, lr, grad norms, λ, sparsity, expert counts
    evals = [(r["step"], r["val_loss"]) for r in resumed_run.read_metrics("eval")]
    full_evals = RunDir(tmp_path / "full").read_metrics("eval")
    assert evals == [(r["step"], r["val_loss"]) for r in full_evals]
    s_full = json.loads((tmp_path / "full" / "summary.json").read_text())
    s_res = json.loads((tmp_path / "resumed" / "summary.json").read_text())
    assert s_res["final_val_loss"] == s_full["final_val_loss"]
    assert s_res["final_lambda"] == s_full["final_lambda"]


def test_resume_restores_the_random_streams(tmp_path: Path, data_dir: Path) -> None:
    """A router that draws random numbers while training (SparseMixer samples its experts, jitter
    draws noise) continues the same curve only if the checkpoint restores the RNG state."""
    ffn = {
        "kind": "moe",
        "router": "sparsemixer",
        "num_experts": 4,
        "top_k": 2,
        "d_hidden": 32,
        "router_options": {"jitter_eps": 0.01},
    }
    cfg = tiny_config(data_dir, ffn=ffn, train={"steps": 6, "eval_every": 0})
    train(cfg, tmp_path / "full")
    train(cfg, tmp_path / "resumed", stop_after=3)
    torch.rand(1000)  # a process that drew other numbers before resuming
    train(cfg, tmp_path / "resumed", resume=True)
    assert train_records(tmp_path / "resumed") == train_records(tmp_path / "full")


def test_resume_drops_metrics_after_the_checkpoint(tmp_path: Path, data_dir: Path) -> None:
    """A run killed after its last checkpoint logged more steps: the resumed run rewrites them."""
    cfg = tiny_config(data_dir, train={"steps": 4}, checkpoint={"every": 2})
    run = tmp_path / "run"
    train(cfg, run, stop_after=2)
    with open(run / "metrics.jsonl", "a") as f:  # what a killed process logged after step 2
        f.write(json.dumps({"kind": "train", "step": 3, "loss": 123.0}) + "\n")
    train(cfg, run, resume=True)
    steps = [r["step"] for r in RunDir(run).read_metrics("train")]
    assert steps == [1, 2, 3, 4]
    assert all(r["loss"] != 123.0 for r in RunDir(run).read_metrics("train"))


@pytest.fixture
def sigint_handler():
    """Set SIGINT's handler for one test, whatever pytest inherited (``SIG_IGN`` when it was
    started with ``&`` from a non-interactive shell), and put the inherited one back after."""
    inherited = signal.getsignal(signal.SIGINT)
    yield lambda handler: signal.signal(signal.SIGINT, handler)
    signal.signal(signal.SIGINT, inherited)


def _interrupted_at_step_2(trainer: Trainer) -> None:
    step = trainer.train_step

    def step_then_interrupt():
        record = step()
        if trainer.step == 2:
            os.kill(os.getpid(), signal.SIGINT)  # what Ctrl-C sends
        return record

    trainer.train_step = step_then_interrupt


def test_ctrl_c_saves_a_checkpoint_and_stops(
    tmp_path: Path, data_dir: Path, sigint_handler
) -> None:
    sigint_handler(signal.default_int_handler)  # an interactive terminal's Python
    cfg = tiny_config(data_dir, train={"steps": 10})
    trainer = Trainer(cfg, tmp_path / "run")
    _interrupted_at_step_2(trainer)
    summary = trainer.run()
    assert summary["interrupted"] and summary["steps"] == 2
    assert RunDir(tmp_path / "run").latest_checkpoint().name == "step_00000002"
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # restored
    done = train(cfg, tmp_path / "run", resume=True)
    assert done["steps"] == 10 and not done.get("interrupted")


def test_an_ignored_sigint_stays_ignored(tmp_path: Path, data_dir: Path, sigint_handler) -> None:
    """Started with SIGINT ignored (in the background), the run does not install its handler:
    a SIGINT neither stops it nor raises, and SIG_IGN is still in place after."""
    sigint_handler(signal.SIG_IGN)
    cfg = tiny_config(data_dir, train={"steps": 4})
    trainer = Trainer(cfg, tmp_path / "run")
    _interrupted_at_step_2(trainer)
    summary = trainer.run()
    assert summary["steps"] == 4 and not summary.get("interrupted")
    assert signal.getsignal(signal.SIGINT) == signal.SIG_IGN


@pytest.mark.slow
def test_sigkilled_run_resumes_to_the_same_metrics(tmp_path: Path, data_dir: Path) -> None:
    """A real `kill -9` at an arbitrary point after the first checkpoint, then --resume."""
    import subprocess
    import sys
    import time

    cfg = tiny_config(
        data_dir, ffn=REMOE, train={"steps": 200, "threads": 1}, checkpoint={"every": 5}
    )
    (tmp_path / "run.yaml").write_text(cfg.to_yaml())
    train(cfg, tmp_path / "full")
    run = tmp_path / "killed"
    cmd = [sys.executable, "-m", "moelab.cli", "train", "--config", str(tmp_path / "run.yaml")]
    proc = subprocess.Popen([*cmd, "--run-dir", str(run)])
    latest = run / "checkpoints" / "latest"
    deadline = time.time() + 120
    while not latest.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(0.3)  # somewhere in the middle of later steps (or a checkpoint write)
    proc.kill()
    assert proc.wait() == -signal.SIGKILL, "the run finished before it could be killed"
    assert not (run / "summary.json").exists()
    assert main_resume(run) == 0
    assert train_records(run) == train_records(tmp_path / "full")


def main_resume(run: Path) -> int:
    from moelab.cli import main

    return main(["train", "--resume", str(run)])
