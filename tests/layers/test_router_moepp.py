"""MoE++: FFN experts and zero / copy / constant experts in one top-k, gating residuals."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from model_checks import assert_causal, assert_checkpointing_keeps_grads, shift_tokens, tiny_lm
from moelab.layers import MoE, RoutingContext
from moelab.layers.routers import MoEPPRouter
from moelab.model import TransformerLM

torch.set_num_threads(2)


def expert_out(moe: MoE, e: int, x_D: torch.Tensor) -> torch.Tensor:
    gate, up = (x_D @ moe.experts.w13_EDF2[e]).chunk(2)
    return (F.silu(gate) * up) @ moe.experts.w2_EFD[e]


def test_hand_checked_selection_weights_and_zero_computation_outputs():
    moe = MoE(
        2,
        8,
        2,
        2,
        router="moepp",
        gating_residual=False,
        balance_coef=0.0,
        zero_experts=1,
        copy_experts=1,
        constant_experts=1,
    ).double()
    r = moe.router  # experts: 0, 1 FFN, 2 zero, 3 copy, 4 constant
    with torch.no_grad():
        r.weight.copy_(torch.tensor([[0.0, 3.0], [-5, -5], [1.0, 0.0], [2.0, 0.0], [3.0, 1.0]]))
        r.const_gate_C2D.zero_()  # α = softmax(0, 0) = (1/2, 1/2)
        r.const_vec_CD.copy_(torch.tensor([[1.0, 2.0]]))
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    out = r(x, None)
    # token 0: logits (0, -5, 1, 2, 3) -> top-2 = constant, copy; no FFN expert
    z0 = sum(math.exp(v) for v in (0, -5, 1, 2, 3))
    p_copy, p_const = math.exp(2) / z0, math.exp(3) / z0
    want0 = [p_copy + p_const * 0.5 + p_const * 0.5 * 1.0, p_const * 0.5 * 2.0]
    # token 1: logits (3, -5, 0, 0, 1) -> top-2 = FFN 0, constant
    z1 = math.exp(3) + math.exp(-5) + 2 + math.exp(1)
    p_ffn, p_const1 = math.exp(3) / z1, math.exp(1) / z1
    want1 = [p_const1 * 0.5 * 1.0, p_const1 * (0.5 * 1.0 + 0.5 * 2.0)]
    torch.testing.assert_close(out.direct_TD, torch.tensor([want0, want1], dtype=torch.float64))
    assert out.decision.token_idx_N.tolist() == [1] and out.decision.expert_idx_N.tolist() == [0]
    assert out.decision.weight_N.item() == pytest.approx(p_ffn, abs=1e-12)
    y = moe(x)
    torch.testing.assert_close(
        y, out.direct_TD + torch.stack([torch.zeros(2), p_ffn * expert_out(moe, 0, x[1])])
    )
    assert moe.last_stats.active_sum == 1  # 1 FFN expert for 2 tokens x k=2 slots


def reference(moe: MoE, x_TD: torch.Tensor, prev_TN: torch.Tensor | None) -> torch.Tensor:
    """Each token's output as a loop over its k choices, every expert kind written out."""
    r = moe.router
    E, Z, C = r.num_experts, r.zero_experts, r.copy_experts
    logits = x_TD @ r.weight.T
    if prev_TN is not None:
        logits = logits + prev_TN @ r.residual_NN.T
    probs = logits.softmax(-1)
    y = torch.zeros_like(x_TD)
    for t in range(x_TD.shape[0]):
        for i in probs[t].detach().topk(r.top_k).indices.tolist():
            g = probs[t, i]
            if i < E:
                y[t] = y[t] + g * expert_out(moe, i, x_TD[t])
            elif i < E + Z:
                pass  # zero expert
            elif i < E + Z + C:
                y[t] = y[t] + g * x_TD[t]
            else:
                c = i - E - Z - C
                a = (r.const_gate_C2D[c] @ x_TD[t]).softmax(-1)
                y[t] = y[t] + g * (a[0] * x_TD[t] + a[1] * r.const_vec_CD[c])
    return y


@pytest.mark.parametrize("with_prev", [False, True])
def test_matches_per_token_loop_reference(with_prev):
    torch.manual_seed(0)
    moe = MoE(
        8,
        16,
        4,
        2,
        router="moepp",
        zero_experts=2,
        copy_experts=1,
        constant_experts=2,
        init_std=0.5,
    ).double()
    x = torch.randn(2, 9, 8, dtype=torch.float64, requires_grad=True)
    prev = torch.randn(18, 9, dtype=torch.float64) if with_prev else None
    ctx = RoutingContext(carried={"moepp_logits": prev} if with_prev else None)
    y = moe(x, context=ctx)
    y_ref = reference(moe, x.reshape(-1, 8), prev).reshape_as(y)
    torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-12)
    passed = ctx.next_layer().get("moepp_logits")
    assert passed.shape == (18, 9)
    # accounting: k slots per token, FFN ones computed by the experts, the rest by the router
    probs = moe.router.logits(x.reshape(-1, 8)).detach()
    if with_prev:
        probs = probs + prev @ moe.router.residual_NN.detach().T
    ffn_slots = int((probs.topk(2).indices < 4).sum())
    s = moe.last_stats
    assert int(s.active_sum) == ffn_slots == int(s.tokens_per_expert.sum())
    assert int(s.active_max) <= 2 and int(s.dropped) == 0
    g_ref = torch.autograd.grad(y_ref.sum(), [x, *moe.router.parameters()], allow_unused=True)
    g = torch.autograd.grad(y.sum(), [x, *moe.router.parameters()], allow_unused=True)
    for a, b in zip(g, g_ref, strict=True):
        if a is None or b is None:  # W_g without a previous layer: no or an all-zero gradient
            assert all(t is None or t.abs().sum() == 0 for t in (a, b))
            continue
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


def _lm(n_layers: int = 2, ckpt: bool = False, **options) -> TransformerLM:
    return tiny_lm(
        "moepp",
        top_k=2,
        router_options=options,
        n_layers=n_layers,
        init_std=0.2,
        activation_checkpointing=ckpt,
    )


def test_gradients_reach_the_residual_map_from_the_second_layer_on():
    model = _lm(3)
    model(torch.randint(0, 50, (2, 10))).square().mean().backward()
    routers = [block.ffn.router for block in model.blocks]
    assert routers[0].residual_NN.grad is not None  # used with weight 0: DDP sees it
    assert routers[0].residual_NN.grad.abs().sum() == 0
    for r in routers[1:]:
        assert r.residual_NN.grad.abs().sum() > 0
    for r in routers:
        assert r.weight.grad.abs().sum() > 0
        assert r.const_vec_CD.grad.abs().sum() > 0 and r.const_gate_C2D.grad.abs().sum() > 0
    no_residual = _lm(2, gating_residual=False)
    assert all(b.ffn.router.residual_NN is None for b in no_residual.blocks)


def test_causal_through_the_model():
    model = _lm(2)
    ids = torch.randint(0, 50, (2, 10))
    assert_causal(model, ids, shift_tokens(ids, 6, 50), atol=1e-5)  # matmul rounding only


def test_padding_gets_nothing_and_counts_nothing():
    torch.manual_seed(1)
    moe = MoE(8, 16, 4, 2, router="moepp")
    x = torch.randn(2, 5, 8)
    mask = torch.tensor([[True] * 5, [True] * 2 + [False] * 3])
    y = moe(x, token_mask=mask)
    assert torch.equal(y[~mask], torch.zeros_like(y[~mask]))
    loss = dict(moe.aux_losses)
    assert int(moe.last_stats.num_tokens) == 7
    moe(torch.cat([x[0], x[1, :2]]))
    torch.testing.assert_close(loss["load_balance"], moe.aux_losses["load_balance"])


def test_heterogeneous_balance_loss_by_hand():
    from moelab.layers.routers.moepp import heterogeneous_balance_loss

    probs = torch.tensor([[0.5, 0.25, 0.25], [0.25, 0.5, 0.25]])
    chosen = torch.tensor([[0], [1]])
    eta = torch.tensor([1.0, 1.0, 0.5])
    # f = (1/2, 1/2, 0), P = (3/8, 3/8, 1/4): 3 · (1·1/2·3/8 + 1·1/2·3/8) = 9/8
    assert heterogeneous_balance_loss(probs, chosen, None, eta).item() == pytest.approx(9 / 8)
    chosen = torch.tensor([[2], [2]])  # f = (0, 0, 1): 3 · 0.5 · 1/4
    assert heterogeneous_balance_loss(probs, chosen, None, eta).item() == pytest.approx(3 / 8)


def test_bad_settings_raise():
    for name in ("zero_experts", "copy_experts", "constant_experts"):
        with pytest.raises(ValueError, match=f"{name} must be an integer >= 0, got -1"):
            MoE(8, 16, 4, 1, router="moepp", **{name: -1})
    with pytest.raises(ValueError, match="balance_tau must be a finite number >= 0"):
        MoE(8, 16, 4, 1, router="moepp", balance_tau=-0.5)
    with pytest.raises(ValueError, match="top_k must be <= num_experts \\+ zero/copy/constant"):
        MoEPPRouter(8, 2, 6, zero_experts=1, copy_experts=1, constant_experts=1)
    MoEPPRouter(8, 2, 5, zero_experts=1, copy_experts=1, constant_experts=1)  # k = N is fine
    with pytest.raises(ValueError, match="gating residuals need the same experts"):
        MoE(8, 16, 4, 1, router="moepp")(
            torch.randn(3, 8), context=RoutingContext(carried={"moepp_logits": torch.zeros(3, 5)})
        )


def test_activation_checkpointing_gives_the_same_gradients():
    ids = torch.randint(0, 50, (2, 10), generator=torch.Generator().manual_seed(5))
    assert_checkpointing_keeps_grads(lambda ckpt: _lm(3, ckpt), ids)
