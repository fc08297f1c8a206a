"""Resume restores every random stream (torch, Python's ``random``, numpy's global one), and an
older checkpoint without RNG state still resumes, with a warning."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch

from moelab.checkpoint_io import load_state, save_state
from moelab.model import TransformerLM
from moelab.rundir import RunDir
from moelab.train import train
from run_fixtures import tiny_config


def _records(run_dir: Path) -> list[tuple[int, float, float]]:
    return [(r["step"], r["loss"], r["grad_norm"]) for r in RunDir(run_dir).read_metrics("train")]


@pytest.fixture
def noisy_forward(monkeypatch: pytest.MonkeyPatch) -> None:
    """A model whose every training forward draws from all three streams, and whose loss shows
    the draws (a stand-in for dropout, random routing or user code drawing from numpy)."""
    forward = TransformerLM.forward

    def noisy(self, *args, **kwargs):
        logits = forward(self, *args, **kwargs)
        noise = random.random() + float(np.random.rand()) + torch.rand(()).item()
        return logits * (1.0 + 1e-3 * noise)

    monkeypatch.setattr(TransformerLM, "forward", noisy)


@pytest.mark.usefixtures("noisy_forward")
def test_resume_continues_every_random_stream(tmp_path: Path, data_dir: Path) -> None:
    cfg = tiny_config(data_dir, train={"steps": 6})
    train(cfg, tmp_path / "full")
    train(cfg, tmp_path / "resumed", stop_after=3)
    random.random(), np.random.rand(7), torch.rand(5)  # the resuming process drew other numbers
    train(cfg, tmp_path / "resumed", resume=True)
    full, resumed = _records(tmp_path / "full"), _records(tmp_path / "resumed")
    assert [r[0] for r in resumed] == [1, 2, 3, 4, 5, 6]
    assert resumed == full  # bit for bit


@pytest.mark.usefixtures("noisy_forward")
def test_a_checkpoint_without_rng_state_resumes_with_a_warning(
    tmp_path: Path, data_dir: Path
) -> None:
    cfg = tiny_config(data_dir, train={"steps": 4})
    run = tmp_path / "run"
    train(cfg, run, stop_after=2)
    state_file = RunDir(run).latest_checkpoint() / RunDir.STATE
    state = load_state(state_file)
    del state["rng"]  # what a checkpoint of an older format holds
    save_state(state, state_file)
    with pytest.warns(UserWarning, match=r"state\.pt holds no RNG state"):
        summary = train(cfg, run, resume=True)
    assert summary["steps"] == 4 and [r[0] for r in _records(run)] == [1, 2, 3, 4]


def test_rng_state_round_trips_through_a_checkpoint_file(tmp_path: Path) -> None:
    """What is saved is read back with ``weights_only=True`` and gives the same next draws."""
    from moelab.train.rng import rng_state, set_rng_state

    np.random.normal()  # numpy's cached Gaussian is part of its state
    save_state({"rng": rng_state()}, tmp_path / "state.pt")
    expected = (random.random(), np.random.normal(), torch.rand(3))
    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    set_rng_state(load_state(tmp_path / "state.pt")["rng"])
    got = (random.random(), np.random.normal(), torch.rand(3))
    assert got[:2] == expected[:2] and torch.equal(got[2], expected[2])
