"""AdaMoE null experts: hand example, loop reference, accounting (real compute saved), gradients,
causality, bad settings."""

from __future__ import annotations

import pytest
import torch

from moelab.layers import MoE
from router_checks import assert_close_with_grads, assert_router_causal, loop_moe, observed_gates

torch.set_num_threads(2)

# E=2 real experts (0, 1) and n=2 null experts (2, 3); k=2. Row t: token t's softmax over all 4.
PROBS = [
    [0.10, 0.40, 0.30, 0.20],  # top-2 = {1, null 2}  -> one real expert: 1 (w 0.4)
    [0.05, 0.15, 0.50, 0.30],  # top-2 = {null 2, null 3} -> no real expert, output 0
    [0.50, 0.30, 0.10, 0.10],  # top-2 = {0, 1}
]


def _hand_moe(**options) -> MoE:
    moe = MoE(4, 8, 2, 2, router="null", null_experts=2, **options).double()
    with torch.no_grad():
        w = torch.zeros(4, 4, dtype=torch.float64)
        w[:, :3] = torch.tensor(PROBS, dtype=torch.float64).log().T  # logits on one-hot token t
        moe.router.weight.copy_(w)
    return moe


def test_hand_example_selection_weights_and_saved_compute():
    x = torch.eye(4, dtype=torch.float64)[:3]
    moe = _hand_moe()
    assert moe.router.weight.shape == (4, 4) and moe.num_experts == 2
    assert observed_gates(moe, x) == [{1: 0.4}, {}, {0: 0.5, 1: 0.3}]
    stats = moe.last_stats
    assert stats.tokens_per_expert.tolist() == [1, 2]
    assert stats.active_sum == 3 and stats.active_mean == 1.0  # < k = 2: a third saved
    assert stats.active_min == 0 and stats.active_max == 2
    y = moe(x)
    assert torch.equal(y[1], torch.zeros_like(y[1]))  # only null experts: no routed output
    renorm = _hand_moe(renormalize=True)
    assert observed_gates(renorm, x) == [{1: round(0.4 / 0.7, 12)}, {}, {0: 0.625, 1: 0.375}]


def test_hand_example_balance_loss_over_all_experts():
    moe = _hand_moe()
    moe(torch.eye(4, dtype=torch.float64)[:3])
    # loads over the 4 experts (null included): 0:1, 1:2, 2:2, 3:1; f = load / (3 tokens · k=2)
    f = [1 / 6, 2 / 6, 2 / 6, 1 / 6]
    p_mean = [sum(row[e] for row in PROBS) / 3 for e in range(4)]
    want = 4 * sum(a * b for a, b in zip(f, p_mean, strict=True))
    # f is float32 in the loss (counts / tokens), hence 1e-6
    assert moe.aux_losses["load_balance"].item() == pytest.approx(want, rel=1e-6)


def _loop_gates(moe: MoE, x_TD: torch.Tensor) -> list[dict[int, torch.Tensor]]:
    """Rank all E + n experts per token, keep the k best, then drop the null ones."""
    probs = (x_TD @ moe.router.weight.T).softmax(-1)
    gates = []
    for t in range(x_TD.shape[0]):
        ranked = sorted(range(probs.shape[1]), key=lambda e: -float(probs[t, e].detach()))
        gates.append({e: probs[t, e] for e in ranked[: moe.top_k] if e < moe.num_experts})
    return gates


def test_matches_per_token_loop_reference():
    torch.manual_seed(0)
    moe = MoE(8, 16, 4, 2, router="null", null_experts=3, init_std=0.5).double()
    x = torch.randn(24, 8, dtype=torch.float64, requires_grad=True)
    y = moe(x)
    gates = _loop_gates(moe, x)
    assert any(len(g) < 2 for g in gates)  # the example exercises null picks
    assert_close_with_grads(moe, x, y, loop_moe(moe, x, gates))
    # null rows of the gate get a gradient too (they share the softmax normaliser)
    y.square().sum().backward()
    assert moe.router.weight.grad[4:].abs().sum() > 0


def test_dropless_accounting_and_padding():
    torch.manual_seed(2)
    moe = MoE(8, 16, 4, 2, router="null", null_experts=2, init_std=0.5)
    x = torch.randn(2, 6, 8)
    mask = torch.ones(2, 6, dtype=torch.bool)
    mask[1, 4:] = False
    moe(x, token_mask=mask)
    gates = _loop_gates(moe, x.reshape(-1, 8))
    n_real = sum(len(g) for g, v in zip(gates, mask.reshape(-1), strict=True) if v)
    stats = moe.last_stats
    assert int(stats.tokens_per_expert.sum()) == n_real == int(stats.active_sum)
    assert int(stats.router_nonzero) == n_real and int(stats.router_total) == 10 * 4
    assert stats.active_mean == n_real / 10 and int(stats.dropped) == 0


def test_zero_null_experts_is_topk():
    torch.manual_seed(3)
    a = MoE(8, 16, 4, 2, router="null", null_experts=0)
    torch.manual_seed(3)
    b = MoE(8, 16, 4, 2, router="topk")
    x = torch.randn(10, 8)
    torch.testing.assert_close(a(x), b(x))
    torch.testing.assert_close(a.aux_losses["load_balance"], b.aux_losses["load_balance"])


def test_causal_through_the_model():
    assert_router_causal("null", null_experts=2)


@pytest.mark.parametrize(
    "options, match",
    [
        (dict(null_experts=-1), "null_experts must be an integer >= 0, got -1"),
        (dict(null_experts=1.5), "null_experts must be an integer >= 0, got 1.5"),
        (dict(balance_coef=-0.1), "balance_coef must be a finite number >= 0"),
    ],
)
def test_bad_settings_raise_one_clear_error(options, match):
    with pytest.raises(ValueError, match=match):
        MoE(8, 16, 4, 2, router="null", **options)
    with pytest.raises(ValueError, match="renormalize needs top_k > 1"):
        MoE(8, 16, 4, 1, router="null", renormalize=True)
