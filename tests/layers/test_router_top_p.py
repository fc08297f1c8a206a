"""Top-p dynamic routing (Huang et al. 2024): hand example, loop reference, accounting, gradients,
causality, training, bad settings."""

from __future__ import annotations

import math

import pytest
import torch

from moelab.layers import MoE, fixed_aux_loss
from router_checks import assert_causal, assert_close_with_grads, loop_moe, observed_gates

torch.set_num_threads(2)

# Four tokens (one-hot inputs), four experts: row t is token t's softmax distribution.
PROBS = [
    [0.50, 0.30, 0.15, 0.05],  # 0.50 >= 0.4 alone            -> {0}
    [0.10, 0.35, 0.30, 0.25],  # 0.35 < 0.4, 0.65 >= 0.4       -> {1, 2}
    [0.20, 0.12, 0.18, 0.50],  # 0.50                          -> {3}
    [0.22, 0.24, 0.26, 0.28],  # 0.28, 0.54                    -> {3, 2}
]


def _hand_moe(**options) -> MoE:
    """A MoE whose router logits on one-hot token t are ``log PROBS[t]`` (softmax = PROBS[t])."""
    moe = MoE(4, 8, 4, 1, router="top_p", **options).double()
    with torch.no_grad():
        moe.router.weight.copy_(torch.tensor(PROBS, dtype=torch.float64).log().T)
    return moe


def test_hand_example_selection_and_weights():
    x = torch.eye(4, dtype=torch.float64)
    assert observed_gates(_hand_moe(p=0.4), x) == [
        {0: 0.5},
        {1: 0.35, 2: 0.3},
        {3: 0.5},
        {3: 0.28, 2: 0.26},
    ]
    # p = 0.7: token 1 needs 0.35 + 0.30 + 0.25 = 0.90; max_experts=2 caps it at two
    assert observed_gates(_hand_moe(p=0.7), x)[1] == {1: 0.35, 2: 0.3, 3: 0.25}
    assert observed_gates(_hand_moe(p=0.7, max_experts=2), x)[1] == {1: 0.35, 2: 0.3}
    assert observed_gates(_hand_moe(p=1.0), x)[0] == {0: 0.5, 1: 0.3, 2: 0.15, 3: 0.05}


def test_hand_example_losses_and_stats():
    moe = _hand_moe(p=0.4, dynamic_loss_coef=1e-4, balance_coef=0.01).train()
    moe(torch.eye(4, dtype=torch.float64))
    stats = moe.last_stats
    assert stats.tokens_per_expert.tolist() == [1, 1, 2, 2]
    assert stats.active_mean == 6 / 4 and stats.active_min == 1 and stats.active_max == 2
    entropy = sum(-sum(p * math.log(p) for p in row) for row in PROBS) / 4
    assert moe.aux_losses["dynamic"].item() == pytest.approx(entropy, rel=1e-12)
    # Switch loss with f_e = fraction of tokens choosing e (eq. 5): 4 · Σ f_e · mean_t P_te
    f = [1 / 4, 1 / 4, 2 / 4, 2 / 4]
    p_mean = [sum(row[e] for row in PROBS) / 4 for e in range(4)]
    balance = 4 * sum(fe * pe for fe, pe in zip(f, p_mean, strict=True))
    assert moe.aux_losses["load_balance"].item() == pytest.approx(balance, rel=1e-12)
    assert moe.aux_coefficients == {"load_balance": 0.01, "dynamic": 1e-4}
    want = 0.01 * moe.aux_losses["load_balance"] + 1e-4 * moe.aux_losses["dynamic"]
    torch.testing.assert_close(fixed_aux_loss([moe]), want)


def _loop_gates(moe: MoE, x_TD: torch.Tensor, p: float) -> list[dict[int, torch.Tensor]]:
    """Top-p written as a Python loop: add experts by decreasing probability while the mass
    gathered so far is below p."""
    probs = (x_TD @ moe.router.weight.T).softmax(-1)
    gates = []
    for t in range(x_TD.shape[0]):
        order = sorted(range(probs.shape[1]), key=lambda e: -float(probs[t, e].detach()))
        chosen, mass = {}, 0.0
        for e in order:
            if mass >= p:
                break
            chosen[e] = probs[t, e]
            mass += float(probs[t, e].detach())
        gates.append(chosen)
    return gates


@pytest.mark.parametrize("p", [0.3, 0.6, 0.9])
def test_matches_per_token_loop_reference(p):
    torch.manual_seed(0)
    moe = MoE(8, 16, 6, 1, router="top_p", p=p, init_std=0.5).double()
    x = torch.randn(20, 8, dtype=torch.float64, requires_grad=True)
    y = moe(x)
    y_ref = loop_moe(moe, x, _loop_gates(moe, x, p))
    assert_close_with_grads(moe, x, y, y_ref)
    # the router gets a gradient through the selected probabilities (no straight-through)
    y.square().sum().backward()
    assert moe.router.weight.grad.abs().sum() > 0


def test_dropless_accounting_and_padding():
    torch.manual_seed(1)
    moe = MoE(8, 16, 6, 1, router="top_p", p=0.7, init_std=0.5)
    x = torch.randn(3, 5, 8)
    mask = torch.ones(3, 5, dtype=torch.bool)
    mask[2, 2:] = False
    y = moe(x, token_mask=mask)
    gates = _loop_gates(moe, x.reshape(-1, 8), 0.7)
    valid = mask.reshape(-1)
    n_assign = sum(len(g) for g, v in zip(gates, valid, strict=True) if v)
    stats = moe.last_stats
    assert int(stats.num_tokens) == 12 and int(stats.tokens_per_expert.sum()) == n_assign
    assert int(stats.active_sum) == n_assign and int(stats.dropped) == 0
    assert stats.active_mean > 1  # variable experts per token, reported
    assert torch.equal(y[2, 2:], torch.zeros_like(y[2, 2:]))  # padding gets no assignment
    # padding enters no loss: changing a padded row leaves the losses unchanged
    losses = {k: v.detach().clone() for k, v in moe.aux_losses.items()}
    x2 = x.clone()
    x2[2, 3] = 100.0
    moe(x2, token_mask=mask)
    for k, v in moe.aux_losses.items():
        torch.testing.assert_close(v, losses[k])


def test_causal_through_the_model():
    assert_causal("top_p", p=0.5)


@pytest.mark.parametrize(
    "options, match",
    [
        (dict(p=0.0), r"p must be in \(0, 1\], got 0.0"),
        (dict(p=1.5), r"p must be in \(0, 1\], got 1.5"),
        (dict(max_experts=0), r"max_experts must be None or an integer in \[1, 4\], got 0"),
        (dict(max_experts=5), r"max_experts must be None or an integer in \[1, 4\], got 5"),
        (dict(dynamic_loss_coef=-1), "dynamic_loss_coef must be a finite number >= 0"),
        (dict(jitter_eps=1.0), r"jitter_eps must be in \[0, 1\), got 1.0"),
    ],
)
def test_bad_settings_raise_one_clear_error(options, match):
    with pytest.raises(ValueError, match=match):
        MoE(8, 16, 4, 1, router="top_p", **options)
