"""The lr schedule against its formula (linear warm-up, half cosine to min_lr_ratio·lr)."""

from __future__ import annotations

import math

import pytest
import torch

from moelab.train.schedule import build_scheduler, lr_at


def reference(step: int, lr: float, warmup: int, total: int, ratio: float) -> float:
    if step < warmup:
        return lr * (step + 1) / warmup
    t = (step - warmup) / (total - 1 - warmup)
    return ratio * lr + 0.5 * (lr - ratio * lr) * (1 + math.cos(math.pi * t))


@pytest.mark.parametrize("warmup,total", [(0, 10), (3, 10), (10, 100)])
def test_lr_matches_formula(warmup: int, total: int) -> None:
    for step in range(total):
        assert lr_at(step, 5e-4, warmup, total, 0.1) == pytest.approx(
            reference(step, 5e-4, warmup, total, 0.1), rel=1e-12
        )


def test_endpoints() -> None:
    assert lr_at(0, 1.0, 4, 20, 0.1) == pytest.approx(0.25)
    assert lr_at(3, 1.0, 4, 20, 0.1) == pytest.approx(1.0)  # end of warm-up
    assert lr_at(4, 1.0, 4, 20, 0.1) == pytest.approx(1.0)  # cosine starts at the peak
    assert lr_at(19, 1.0, 4, 20, 0.1) == pytest.approx(0.1)  # last step at the floor (paper: 5e-5)
    assert lr_at(500, 1.0, 4, 20, 0.1) == pytest.approx(0.1)


def test_scheduler_drives_every_param_group() -> None:
    p1, p2 = torch.nn.Parameter(torch.zeros(2, 2)), torch.nn.Parameter(torch.zeros(2))
    opt = torch.optim.SGD([{"params": [p1]}, {"params": [p2]}], lr=2e-3)
    sched = build_scheduler(opt, warmup_steps=2, total_steps=8, min_lr_ratio=0.1)
    for step in range(8):
        for group in opt.param_groups:
            assert group["lr"] == pytest.approx(lr_at(step, 2e-3, 2, 8, 0.1))
        opt.step()
        sched.step()
    state = sched.state_dict()
    assert state["lr_lambdas"][0]["total_steps"] == 8  # the schedule's parameters are saved


def test_retarget_follows_a_longer_run_from_the_current_step() -> None:
    """A resumed run with more steps (or another lr) continues on the new schedule."""
    p = torch.nn.Parameter(torch.zeros(2))
    opt = torch.optim.SGD([{"params": [p]}, {"params": []}], lr=1e-3)
    sched = build_scheduler(opt, warmup_steps=2, total_steps=8, min_lr_ratio=0.1)
    for _ in range(5):
        opt.step()
        sched.step()
    restored = build_scheduler(opt, warmup_steps=2, total_steps=8, min_lr_ratio=0.1)
    restored.load_state_dict(sched.state_dict())
    restored.retarget(2e-3, 2, 20, 0.2)
    for step in range(5, 20):
        for group in opt.param_groups:
            assert group["lr"] == pytest.approx(lr_at(step, 2e-3, 2, 20, 0.2))
        opt.step()
        restored.step()
    assert restored.state_dict()["lr_lambdas"][0]["total_steps"] == 20
