"""DeepSeek-V3 aux-loss-free balancing: hand example of the biased selection and unbiased gates,
the between-step bias update (directly and through RouterLoadHook), loop reference, accounting,
gradients, the sequence-wise loss, causality, bad settings."""

from __future__ import annotations

import math

import pytest
import torch

from moelab.layers import MoE, RouterLoadHook, RoutingContext
from router_checks import assert_close_with_grads, assert_router_causal, loop_moe, observed_gates

torch.set_num_threads(2)


def _sig(v: float) -> float:
    return 1 / (1 + math.exp(-v))


def _hand_moe(**options) -> MoE:
    """E=4, k=2; logits of one-hot token 0 are [2, 1, 0, -1], of token 1 [0, 0.5, 1, 3]."""
    moe = MoE(4, 8, 4, 2, router="aux_free", **options).double()
    with torch.no_grad():
        w = torch.zeros(4, 4, dtype=torch.float64)
        w[:, 0] = torch.tensor([2.0, 1.0, 0.0, -1.0])
        w[:, 1] = torch.tensor([0.0, 0.5, 1.0, 3.0])
        moe.router.weight.copy_(w)
    return moe


def test_hand_example_bias_selects_gate_stays_unbiased():
    x = torch.eye(4, dtype=torch.float64)[:2]
    moe = _hand_moe()
    s0 = [_sig(v) for v in (2.0, 1.0, 0.0, -1.0)]
    s1 = [_sig(v) for v in (0.0, 0.5, 1.0, 3.0)]
    r = lambda v: round(v, 12)  # noqa: E731
    assert observed_gates(moe, x) == [
        {0: r(s0[0] / (s0[0] + s0[1])), 1: r(s0[1] / (s0[0] + s0[1]))},
        {3: r(s1[3] / (s1[3] + s1[2])), 2: r(s1[2] / (s1[3] + s1[2]))},
    ]
    with torch.no_grad():  # +1 on expert 3: 0.269 + 1 beats 0.731 for token 0
        moe.router.bias_E.copy_(torch.tensor([0.0, 0.0, -1.0, 1.0]))
    # token 0: biased [0.881, 0.731, -0.5, 1.269] -> {3, 0}; gates from the unbiased s
    # token 1: biased [0.5, 0.622, -0.269, 1.953] -> {3, 1}
    assert observed_gates(moe, x) == [
        {3: r(s0[3] / (s0[3] + s0[0])), 0: r(s0[0] / (s0[3] + s0[0]))},
        {3: r(s1[3] / (s1[3] + s1[1])), 1: r(s1[1] / (s1[3] + s1[1]))},
    ]
    raw = _hand_moe(normalize=False)
    assert observed_gates(raw, x)[0] == {0: r(s0[0]), 1: r(s0[1])}
    soft = _hand_moe(score="softmax", normalize=False)
    z = sum(math.exp(v) for v in (2.0, 1.0, 0.0, -1.0))
    assert observed_gates(soft, x)[0] == {0: r(math.exp(2) / z), 1: r(math.exp(1) / z)}


def test_step_update_moves_the_bias_by_sign():
    moe = _hand_moe(bias_update_rate=0.01)
    moe.router.step_update(torch.tensor([10.0, 2.0, 4.0, 0.0]))  # mean 4
    assert moe.router.bias_E.tolist() == pytest.approx([-0.01, 0.01, 0.0, 0.01], abs=1e-9)
    moe.router.step_update(torch.tensor([10.0, 2.0, 4.0, 0.0]))
    assert moe.router.bias_E.tolist() == pytest.approx([-0.02, 0.02, 0.0, 0.02], abs=1e-9)
    assert "router.bias_E" in moe.state_dict()
    assert not moe.router.bias_E.requires_grad


def test_forward_never_changes_the_bias_and_the_hook_does():
    torch.manual_seed(0)
    moe = MoE(8, 16, 4, 2, router="aux_free", bias_update_rate=0.1).train()
    hook = RouterLoadHook.for_layers([moe])
    loads = torch.zeros(4, dtype=torch.float64)
    for _ in range(3):  # three micro-batches of one step
        moe(torch.randn(6, 8))
        assert torch.equal(moe.router.bias_E, torch.zeros(4))
        loads += moe.last_stats.tokens_per_expert
        hook.observe()
    hook.step()
    want = 0.1 * torch.sign(loads.mean() - loads)
    torch.testing.assert_close(moe.router.bias_E, want.float())


def test_the_hook_observes_the_layers_it_is_given():
    """``observe(layers)`` reads the loads of the layers passed (the trainer passes every routed
    layer, as to every between-step hook), skipping those without a stateful router; a stateful
    layer the hook was not built for is an error, not silently replaced by the hook's own."""
    torch.manual_seed(0)
    first, second = (MoE(8, 16, 4, 2, router="aux_free", bias_update_rate=0.1) for _ in range(2))
    plain = MoE(8, 16, 4, 2)  # no state between steps: skipped
    hook = RouterLoadHook.for_layers([first, plain, second])
    assert hook.layers == [first, second]
    for moe in (first, plain, second):
        moe.train()(torch.randn(6, 8))
    hook.observe([first, plain])  # second not observed this step
    with pytest.raises(RuntimeError, match="observe"):
        hook.step()
    stranger = MoE(8, 16, 4, 2, router="aux_free").train()
    stranger(torch.randn(6, 8))
    with pytest.raises(ValueError, match="not built for"):
        hook.observe([first, stranger])
    hook.observe([first, plain, second])
    hook.step()
    assert hook.steps == 1 and first.router.bias_E.abs().sum() > 0


def _loop_gates(moe: MoE, x_TD: torch.Tensor) -> list[dict[int, torch.Tensor]]:
    """For each token: rank experts by sigmoid(logit) + bias, keep the k best, gate by the
    unbiased sigmoid divided by the kept ones' sum."""
    router = moe.router
    gates = []
    for t in range(x_TD.shape[0]):
        s = [torch.sigmoid(x_TD[t] @ router.weight[e]) for e in range(moe.num_experts)]
        ranked = sorted(
            range(moe.num_experts), key=lambda e: -(float(s[e].detach()) + float(router.bias_E[e]))
        )
        kept = ranked[: moe.top_k]
        total = sum(s[e] for e in kept)
        gates.append({e: s[e] / total for e in kept})
    return gates


def test_matches_per_token_loop_reference_with_a_bias():
    torch.manual_seed(0)
    moe = MoE(8, 16, 6, 2, router="aux_free", init_std=0.5).double()
    with torch.no_grad():
        moe.router.bias_E.copy_(torch.tensor([0.3, -0.2, 0.0, 0.1, -0.4, 0.2]))
    x = torch.randn(20, 8, dtype=torch.float64, requires_grad=True)
    y = moe(x)
    assert_close_with_grads(moe, x, y, loop_moe(moe, x, _loop_gates(moe, x)))


def test_dropless_accounting_padding_and_no_loss_by_default():
    torch.manual_seed(1)
    moe = MoE(8, 16, 4, 2, router="aux_free")
    x = torch.randn(2, 5, 8)
    mask = torch.ones(2, 5, dtype=torch.bool)
    mask[0, 3:] = False
    moe(x, token_mask=mask)
    stats = moe.last_stats
    assert int(stats.tokens_per_expert.sum()) == 8 * 2 == int(stats.active_sum)
    assert stats.active_min == stats.active_max == 2 and int(stats.dropped) == 0
    assert moe.aux_losses == {}  # aux-loss-free: no loss unless seq_balance_coef > 0


def test_sequence_balance_loss_hand_example():
    """Two sequences of 2 tokens, k=1, E=2 (normalize=False): DeepSeek-V3 eq. 17-20 per
    sequence, averaged over sequences."""
    moe = MoE(2, 8, 2, 1, router="aux_free", normalize=False, seq_balance_coef=1e-4).double()
    with torch.no_grad():
        moe.router.weight.copy_(torch.eye(2, dtype=torch.float64))
    x = torch.tensor([[[1.0, 0.0], [2.0, 0.0]], [[0.0, 1.0], [1.0, 0.0]]], dtype=torch.float64)
    ctx = RoutingContext(token_ids=torch.zeros(2, 2, dtype=torch.long))
    moe(x, context=ctx)

    def seq_loss(rows):  # rows: logits of the tokens of one sequence
        s = [[_sig(v) for v in row] for row in rows]
        s_norm = [[v / sum(r) for v in r] for r in s]
        chosen = [max(range(2), key=lambda e: r[e]) for r in s]
        f = [2 / (1 * len(rows)) * sum(c == e for c in chosen) for e in range(2)]
        p = [sum(r[e] for r in s_norm) / len(rows) for e in range(2)]
        return sum(a * b for a, b in zip(f, p, strict=True))

    want = (seq_loss([[1, 0], [2, 0]]) + seq_loss([[0, 1], [1, 0]])) / 2
    assert moe.aux_losses["seq_balance"].item() == pytest.approx(want, rel=1e-6)
    assert moe.aux_coefficients == {"seq_balance": 1e-4}
    with pytest.raises(ValueError, match="seq_balance_coef > 0 needs the sequence structure"):
        moe(x)


def test_causal_through_the_model():
    assert_router_causal("aux_free")
    assert_router_causal("aux_free", score="softmax", seq_balance_coef=1e-4)


@pytest.mark.parametrize(
    "options, match",
    [
        (dict(score="relu"), "score must be one of 'sigmoid', 'softmax', got 'relu'"),
        (dict(bias_update_rate=-1), "bias_update_rate must be a finite number >= 0"),
        (dict(seq_balance_coef=float("nan")), "seq_balance_coef must be a finite number >= 0"),
    ],
)
def test_bad_settings_raise_one_clear_error(options, match):
    with pytest.raises(ValueError, match=match):
        MoE(8, 16, 4, 2, router="aux_free", **options)


def test_normalize_needs_top_k_above_one():
    with pytest.raises(ValueError, match="normalize needs top_k > 1.*normalize=false"):
        MoE(8, 16, 4, 1, router="aux_free")
    MoE(8, 16, 4, 1, router="aux_free", normalize=False)
