"""Chain-of-Experts (``MoE(iterations=C)``): C = 1 is today's layer, a per-token loop reference for
two and three iterations, every iteration's aux losses and statistics, gradients, accounting."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from moelab.layers import MoE
from moelab.model.ffn_configs import MoEConfig

torch.set_num_threads(2)


def _expert(moe, e, x_D):
    gate, up = (x_D @ moe.experts.w13_EDF2[e]).chunk(2)
    return (F.silu(gate) * up) @ moe.experts.w2_EFD[e]


def _reference(moe, x_TD):
    """Per token: x⁽ᵗ⁾ = x⁽ᵗ⁻¹⁾ + Σ_top-k p_e·E_e(x⁽ᵗ⁻¹⁾) + shared(x⁽ᵗ⁻¹⁾); returns x⁽ᶜ⁾ − x⁽⁰⁾."""
    routers = [moe.router, *moe.chain_routers]
    out = torch.zeros_like(x_TD)
    for t in range(x_TD.shape[0]):
        h = x_TD[t]
        for router in routers:
            probs = (router.weight @ h).softmax(-1)
            chosen = sorted(range(moe.num_experts), key=lambda e: -probs[e].item())[: moe.top_k]
            step = sum(probs[e] * _expert(moe, e, h) for e in chosen)
            if moe.shared is not None:
                step = step + moe.shared(h[None])[0]
            h = h + step
        out[t] = h - x_TD[t]
    return out


def test_one_iteration_is_todays_layer():
    torch.manual_seed(0)
    a = MoE(8, 16, 4, 2, init_std=0.3)
    torch.manual_seed(0)
    b = MoE(8, 16, 4, 2, init_std=0.3, iterations=1)
    assert len(b.chain_routers) == 0
    assert a.state_dict().keys() == b.state_dict().keys()
    x = torch.randn(2, 5, 8)
    assert torch.equal(a(x), b(x))


@pytest.mark.parametrize("iterations,shared", [(2, 0), (3, 1)])
def test_matches_per_token_loop_reference(iterations, shared):
    torch.manual_seed(1)
    moe = MoE(8, 16, 4, 2, init_std=0.3, iterations=iterations, shared_experts=shared).double()
    x = torch.randn(2, 6, 8, dtype=torch.float64, requires_grad=True)
    y = moe(x)
    y_ref = _reference(moe, x.reshape(-1, 8)).reshape_as(y)
    torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-12)
    params = [x, *moe.parameters()]
    g = torch.autograd.grad(y.square().sum(), params)
    g_ref = torch.autograd.grad(y_ref.square().sum(), params)
    for a, b in zip(g, g_ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)
    assert all(r.weight.grad is None for r in moe.chain_routers)
    assert all(gr.abs().sum() > 0 for gr in g[1:])  # every router (and expert) is trained


def _switch_loss(probs_TE, chosen_TK, num_experts, k):
    """Switch eq. 4 written out: E/(T·k) Σ_e count_e · mean_t p_te."""
    T = probs_TE.shape[0]
    counts = [0] * num_experts
    for row in chosen_TK.tolist():
        for e in row:
            counts[e] += 1
    mean_p = probs_TE.mean(0).tolist()
    return num_experts / (T * k) * sum(c * p for c, p in zip(counts, mean_p, strict=True))


def test_every_iterations_aux_losses_and_stats_counted():
    torch.manual_seed(2)
    moe = MoE(8, 16, 4, 1, init_std=0.3, iterations=2, z_loss_coef=1e-3).double()
    x = torch.randn(10, 8, dtype=torch.float64)
    y = moe(x)
    # each iteration's switch loss, recomputed from its own input
    h1 = x + _reference_first_step(moe, x)
    want = 0.0
    for router, h in ((moe.router, x), (moe.chain_routers[0], h1)):
        logits = h @ router.weight.T
        want += _switch_loss(logits.softmax(-1), logits.topk(1).indices, 4, 1)
    assert moe.aux_losses["load_balance"].item() == pytest.approx(want, rel=1e-6)
    assert set(moe.aux_losses) == {"load_balance", "z_loss"}
    s = moe.last_stats
    assert int(s.tokens_per_expert.sum()) == 10 * 1 * 2 and int(s.num_tokens) == 20
    assert int(s.dropped) == 0 and s.active_min == s.active_max == 1
    assert torch.isfinite(y).all()


def _reference_first_step(moe, x):
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        probs = (moe.router.weight @ x[t]).softmax(-1)
        e = int(probs.argmax())
        out[t] = probs[e] * _expert(moe, e, x[t])
    return out


def test_accounting_multiplies_active_compute():
    one = MoEConfig(d_hidden=64, num_experts=8, top_k=2).accounting(32)
    two = MoEConfig(d_hidden=64, num_experts=8, top_k=2, iterations=2).accounting(32)
    router = 32 * 8
    expert = 3 * 32 * 64
    assert one["active_params"] == 2 * expert + router
    assert two["active_params"] == 2 * (2 * expert + router)
    assert two["total_params"] == one["total_params"] + router
    # the paper's matched compute: half the experts per iteration
    half = MoEConfig(d_hidden=64, num_experts=8, top_k=1, iterations=2).accounting(32)
    assert half["active_params"] == one["active_params"] + router
    built = MoEConfig(d_hidden=64, num_experts=8, top_k=2, iterations=2).build(32, 0.02)
    assert sum(p.numel() for p in built.parameters()) == two["total_params"]


def test_bad_settings():
    with pytest.raises(ValueError, match=r"^iterations must be a positive integer \(1: no chain\)"):
        MoE(8, 16, 4, 1, iterations=0)
    with pytest.raises(ValueError, match="iterations: must be a positive integer"):
        MoEConfig(iterations=1.5).validate()
    assert math.isfinite(
        MoE(8, 16, 4, 1, router="relu", iterations=2)(torch.randn(3, 8)).sum().item()
    )


def test_observer_sees_the_first_pass_once():
    moe = MoE(8, 16, 4, 1, iterations=3)
    seen = []
    moe.routing_observer = lambda layer, decision, x: seen.append(decision.num_tokens)
    moe(torch.randn(5, 8))
    assert seen == [5]
