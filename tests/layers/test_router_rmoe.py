"""RMoE's layerwise recurrent router: a hand-checked GRU step, a per-token loop reference over
three layers (torch's own GRUCell), the state's gradient path across layers, the shared GRU."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from model_checks import assert_causal, assert_checkpointing_keeps_grads, shift_tokens, tiny_lm
from moelab.layers import MoE, RoutingContext
from moelab.layers.routers import RecurrentRouter, share_recurrent_routers
from moelab.model.accounting import accounting

torch.set_num_threads(2)


def _chain(layers, xs, masks=None):
    """Run MoE layers in order, each on its own input, passing the routing context on."""
    ctx = RoutingContext()
    ys = []
    for i, (layer, x) in enumerate(zip(layers, xs, strict=True)):
        ys.append(layer(x, token_mask=None if masks is None else masks[i], context=ctx))
        ctx = ctx.next_layer()
    return ys


def _layers(n=3, **kw):
    torch.manual_seed(0)
    layers = [MoE(8, 16, 4, 2, router="rmoe", hidden_dim=6, init_std=0.3, **kw) for _ in range(n)]
    share_recurrent_routers(layers)
    return [layer.double() for layer in layers]


def test_hand_checked_gru_step_and_top1():
    moe = MoE(1, 4, 2, 1, router="rmoe", hidden_dim=1, balance_coef=0.0).double()
    r = moe.router
    with torch.no_grad():
        r.proj.fill_(1.0)
        r.gru.w_ih.copy_(torch.tensor([[0.0], [0.0], [1.0]]))  # rows: reset, update, new
        r.gru.w_hh.zero_()
        r.gru.b_ih.zero_()
        r.gru.b_hh.zero_()
        r.weight.copy_(torch.tensor([[1.0], [-1.0]]))
    ctx = RoutingContext(carried={"rmoe_hidden": torch.tensor([[0.2], [0.2]], dtype=torch.float64)})
    out = r(torch.tensor([[0.5], [-0.5]], dtype=torch.float64), None, ctx)
    # r = z = sigmoid(0) = 1/2, n = tanh(x'), h = (1 - z)·n + z·h_prev
    h0 = 0.5 * math.tanh(0.5) + 0.5 * 0.2  # 0.3311: positive, expert 0
    h1 = 0.5 * math.tanh(-0.5) + 0.5 * 0.2  # -0.1311: negative, expert 1
    passed = ctx.next_layer().get("rmoe_hidden")
    torch.testing.assert_close(passed, torch.tensor([[h0], [h1]], dtype=torch.float64))
    assert out.decision.expert_idx_N.tolist() == [0, 1]
    # logits (h, -h): softmax weight of the chosen expert is sigmoid(2|h|)
    want = [1 / (1 + math.exp(-2 * abs(h))) for h in (h0, h1)]
    torch.testing.assert_close(out.decision.weight_N, torch.tensor(want, dtype=torch.float64))


def _reference(layers, xs):
    """Per token: a torch GRUCell carries h across the layers; Σ softmax weight · expert(x)."""
    gru = torch.nn.GRUCell(6, 6).double()
    src = layers[0].router.gru
    with torch.no_grad():
        gru.weight_ih.copy_(src.w_ih)
        gru.weight_hh.copy_(src.w_hh)
        gru.bias_ih.copy_(src.b_ih)
        gru.bias_hh.copy_(src.b_hh)
    T = xs[0].shape[0]
    outs = [torch.zeros_like(x) for x in xs]
    for t in range(T):
        h = torch.zeros(1, 6, dtype=torch.float64)
        for layer, x, out in zip(layers, xs, outs, strict=True):
            h = gru((x[t] @ layer.router.proj.T)[None], h)
            logits = (h @ layer.router.weight.T)[0]
            probs = [math.exp(v) for v in logits.tolist()]
            probs = [p / sum(probs) for p in probs]
            ranked = sorted(range(len(probs)), key=lambda e: -probs[e])[: layer.top_k]
            for e in ranked:
                w13, w2 = layer.experts.w13_EDF2[e], layer.experts.w2_EFD[e]
                gate, up = (x[t] @ w13).chunk(2)
                out[t] = out[t] + probs[e] * ((F.silu(gate) * up) @ w2)
    return outs


def test_matches_per_token_loop_reference_over_three_layers():
    layers = _layers()
    xs = [torch.randn(11, 8, dtype=torch.float64) for _ in layers]
    ys = _chain(layers, xs)
    for y, y_ref in zip(ys, _reference(layers, xs), strict=True):
        torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-12)


def test_dropless_and_padding_left_out():
    layers = _layers(2)
    xs = [torch.randn(2, 5, 8, dtype=torch.float64) for _ in layers]
    mask = torch.tensor([[True] * 5, [True] * 2 + [False] * 3])
    ys = _chain(layers, xs, [mask, mask])
    for layer, y in zip(layers, ys, strict=True):
        s = layer.last_stats
        assert int(s.num_tokens) == 7 and int(s.tokens_per_expert.sum()) == 7 * 2
        assert s.active_min == s.active_max == 2 and int(s.dropped) == 0
        assert torch.equal(y[~mask], torch.zeros_like(y[~mask]))


def test_state_carries_gradient_to_earlier_layers():
    """Layer 2's routing (its balance loss only) trains layer 1's projector, through h_1."""
    layers = _layers(2)
    xs = [torch.randn(9, 8, dtype=torch.float64) for _ in layers]  # independent inputs
    _chain(layers, xs)
    loss = layers[1].aux_losses["load_balance"]
    g_proj, g_gru = torch.autograd.grad(loss, [layers[0].router.proj, layers[0].router.gru.w_ih])
    assert g_proj.abs().sum() > 0 and g_gru.abs().sum() > 0
    # ... and nothing reaches layer 1's own gate or experts, which h_1 does not depend on
    g = torch.autograd.grad(
        loss, [layers[0].router.weight, layers[0].experts.w13_EDF2], allow_unused=True
    )
    assert all(x is None or x.abs().sum() == 0 for x in g)


def _lm(ckpt=False, hidden_dim=4):
    return tiny_lm(
        "rmoe",
        router_options={"hidden_dim": hidden_dim},
        n_layers=3,
        activation_checkpointing=ckpt,
    )


def test_one_gru_for_all_layers_counted_once_and_saved():
    model = _lm()
    grus = {id(block.ffn.router.gru) for block in model.blocks}
    assert len(grus) == 1
    projs = {id(block.ffn.router.proj) for block in model.blocks}
    assert len(projs) == 3
    acc = accounting(model)
    assert "unclassified_params" not in acc
    assert acc["total_params"] == sum(p.numel() for p in model.parameters())
    ids = torch.randint(0, 50, (2, 7))
    other = _lm()
    with torch.no_grad():
        for p in other.parameters():
            p.add_(1.0)
    other.load_state_dict(model.state_dict())
    assert len({id(block.ffn.router.gru) for block in other.blocks}) == 1
    torch.testing.assert_close(other(ids), model(ids))


def test_causal_through_the_model_and_with_activation_checkpointing():
    model = _lm().eval()
    ids = torch.randint(0, 50, (2, 10))
    assert_causal(model, ids, shift_tokens(ids, 6, 50), atol=1e-5)
    assert_checkpointing_keeps_grads(_lm, ids)


def test_bad_settings():
    with pytest.raises(ValueError, match=r"^hidden_dim must be a positive integer, got 0$"):
        MoE(8, 16, 4, 1, router="rmoe", hidden_dim=0)
    a, b = RecurrentRouter(8, 4, 1, hidden_dim=4), RecurrentRouter(8, 4, 1, hidden_dim=6)
    with pytest.raises(ValueError, match="hidden_dim must be the same in every 'rmoe' layer"):
        share_recurrent_routers([a, b])
    with pytest.raises(ValueError, match="hidden_dim must be a positive integer"):
        _lm(hidden_dim=-1)
