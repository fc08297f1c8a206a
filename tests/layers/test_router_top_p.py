"""Top-p dynamic routing (Huang et al. 2024): hand example, loop reference, accounting, gradients,
causality, training, bad settings."""

from __future__ import annotations

import math

import pytest
import torch

from moelab.layers import MoE, fixed_aux_loss
from router_checks import assert_close_with_grads, assert_router_causal, loop_moe, observed_gates

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


def _loop_selection(probs_TE: torch.Tensor, p: float, max_experts: int | None) -> list[list[int]]:
    """The experts top-p selects, token by token in Python floats: experts by decreasing
    probability (ties: lower index first), added while the mass gathered so far is below p
    (p = 1: every expert), at most max_experts."""
    chosen_T = []
    for row in probs_TE.tolist():  # exact float64 copies of the probabilities
        order = sorted(range(len(row)), key=lambda e: (-row[e], e))
        chosen, mass = [], 0.0
        for e in order:
            if chosen and p < 1 and mass >= p:
                break
            if max_experts is not None and len(chosen) == max_experts:
                break
            chosen.append(e)
            mass += row[e]
        chosen_T.append(sorted(chosen))
    return chosen_T


def _selection(moe: MoE, x_TD: torch.Tensor) -> list[list[int]]:
    """The experts the layer's decision gives each token (seen by the routing observer)."""
    return [sorted(g) for g in observed_gates(moe, x_TD)]


@pytest.mark.parametrize("max_experts", [None, 3])
@pytest.mark.parametrize("p", [1.0, 0.999999, 0.9, 0.5])
def test_float32_selection_matches_the_loop_on_1500_tokens(p, max_experts):
    """Router init std 2 spreads the probabilities over many orders of magnitude: at p = 1 the
    float32 cumulative mass used to reach 1.0 before the last experts and cut them."""
    torch.manual_seed(0)
    moe = MoE(16, 8, 8, 1, router="top_p", p=p, max_experts=max_experts, init_std=2.0)
    x = torch.randn(1500, 16)
    with torch.no_grad():
        probs = moe.router.logits(x).softmax(-1)
    got = _selection(moe, x)
    assert got == _loop_selection(probs, p, max_experts)
    if p == 1.0:  # every expert, or max_experts of them, for every token
        assert all(len(c) == (max_experts or 8) for c in got)


def test_p_at_the_mass_of_the_first_expert():
    """p just below / at the top expert's probability: that expert alone; just above: two. The
    boundary is the float64 value of p, not p rounded to the probabilities' float32."""
    moe = MoE(4, 8, 4, 1, router="top_p", init_std=1.0)
    x = torch.randn(5, 4, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        top = moe.router.logits(x).softmax(-1).max(-1).values.tolist()
    for t, mass in enumerate(top):
        for p, count in [
            (math.nextafter(mass, 0.0), 1),
            (mass, 1),
            (math.nextafter(mass, 1.0), 2),
            (mass + 1e-12, 2),
        ]:
            moe.router.p = p
            assert len(_selection(moe, x[t : t + 1])[0]) == count, (t, p)


def test_ties_are_ranked_by_expert_index():
    """Equal probabilities (a zero router: 1/8 each, exact in float32): the lower indices first,
    and the boundary of a tie is exact (0.25 = two experts' mass)."""
    moe = MoE(4, 8, 8, 1, router="top_p")
    with torch.no_grad():
        moe.router.weight.zero_()
    x = torch.randn(3, 4)
    for p, want in [(0.125, 1), (0.25, 2), (0.25 + 1e-12, 3), (0.3, 3), (1.0, 8)]:
        moe.router.p = p
        assert _selection(moe, x) == [list(range(want))] * 3, p
    moe.router.p, moe.router.max_experts = 1.0, 5
    assert _selection(moe, x) == [list(range(5))] * 3


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
    assert_router_causal("top_p", p=0.5)


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
