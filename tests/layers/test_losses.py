"""Aux losses against hand-computed values; normalisation invariances (each loss normalised once,
by its own valid tokens)."""

from __future__ import annotations

import math

import pytest
import torch

from moelab.layers.losses import remoe_l1_loss, router_z_loss, switch_load_balance_loss


def test_switch_loss_hand_computed():
    probs = torch.tensor([[0.9, 0.1], [0.8, 0.2], [0.3, 0.7], [0.6, 0.4]], requires_grad=True)
    counts = torch.tensor([3, 1])  # top-1 picks 0, 0, 1, 0
    loss = switch_load_balance_loss(probs, counts, None, top_k=1)
    # f = [3/4, 1/4], P = [0.65, 0.35]: 2 * (0.75*0.65 + 0.25*0.35) = 1.15
    assert loss.item() == pytest.approx(1.15, abs=1e-6)
    (grad,) = torch.autograd.grad(loss, probs)
    # dL/dp_te = E * f_e / T; f is a constant (no gradient through the counts)
    expected = torch.tensor([2 * 0.75 / 4, 2 * 0.25 / 4]).expand(4, 2)
    torch.testing.assert_close(grad, expected)


def test_switch_loss_is_one_when_perfectly_balanced_and_E_when_collapsed():
    E, T, k = 4, 8, 2
    uniform = torch.full((T, E), 1 / E)
    assert switch_load_balance_loss(uniform, torch.full((E,), T * k // E), None, k).item() == (
        pytest.approx(1.0)
    )
    onehot = torch.zeros(T, E)
    onehot[:, 0] = 1.0
    counts = torch.tensor([T, 0, 0, 0])
    assert switch_load_balance_loss(onehot, counts, None, 1).item() == pytest.approx(E)


def test_switch_loss_ignores_padding():
    probs = torch.tensor([[0.9, 0.1], [0.8, 0.2], [0.5, 0.5]])
    mask = torch.tensor([True, True, False])
    masked = switch_load_balance_loss(probs, torch.tensor([2, 0]), mask, 1)
    assert masked.item() == pytest.approx(
        switch_load_balance_loss(probs[:2], torch.tensor([2, 0]), None, 1).item()
    )


def test_z_loss_hand_computed():
    logits = torch.tensor([[0.0, 0.0], [math.log(3.0), 0.0]])
    # logsumexp: log 2 and log 4
    expected = (math.log(2) ** 2 + math.log(4) ** 2) / 2
    assert router_z_loss(logits, None).item() == pytest.approx(expected, rel=1e-6)


def test_remoe_l1_hand_computed_and_f_is_constant():
    r = torch.tensor([[0.5, 0.0], [0.2, 0.4]], requires_grad=True)
    # E=2, k=1, T=2: f = E/(kT) * active count = [2, 1]; L = (2*0.5 + 2*0.2 + 1*0.4) / 2 = 0.9
    loss = remoe_l1_loss(r, None, top_k=1)
    assert loss.item() == pytest.approx(0.9, abs=1e-6)
    (grad,) = torch.autograd.grad(loss, r)
    torch.testing.assert_close(grad, torch.tensor([[1.0, 0.5], [1.0, 0.5]]))  # f_e / T
    plain = remoe_l1_loss(r, None, top_k=1, balanced=False)
    assert plain.item() == pytest.approx(0.55, abs=1e-6)


def test_remoe_l1_all_zero_rows_and_empty_batch_are_finite():
    r = torch.zeros(3, 4, requires_grad=True)
    loss = remoe_l1_loss(r, None, top_k=1)
    assert loss.item() == 0.0
    (grad,) = torch.autograd.grad(loss, r)
    assert torch.isfinite(grad).all()
    empty = remoe_l1_loss(torch.zeros(3, 4), torch.zeros(3, dtype=torch.bool), top_k=1)
    assert empty.item() == 0.0


def _relu_scores(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return torch.relu(x @ w)


@pytest.mark.parametrize("which", ["l1_plain", "z_loss", "l1_balanced_same_stats"])
def test_micro_batches_give_the_one_piece_gradient(which):
    """A step split into micro-batches, each loss weighted by its share of the tokens (what the
    trainer does), gives the same gradient as the whole batch in one piece."""
    torch.manual_seed(0)
    w = torch.randn(6, 4, dtype=torch.float64, requires_grad=True)
    a = torch.randn(10, 6, dtype=torch.float64)
    b = a.clone() if which == "l1_balanced_same_stats" else torch.randn(10, 6, dtype=torch.float64)

    def loss_of(x: torch.Tensor) -> torch.Tensor:
        if which == "z_loss":
            return router_z_loss(x @ w, None)
        return remoe_l1_loss(_relu_scores(x, w), None, 1, balanced=which != "l1_plain")

    (whole,) = torch.autograd.grad(loss_of(torch.cat([a, b])), w)
    (ga,) = torch.autograd.grad(loss_of(a) * 0.5, w)
    (gb,) = torch.autograd.grad(loss_of(b) * 0.5, w)
    torch.testing.assert_close(ga + gb, whole)
