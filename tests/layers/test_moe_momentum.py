"""MomentumSMoE (``MoE(momentum=μ, momentum_step=γ)``): off is the plain MoE, a hand-checked
two-layer heavy ball, gradients through the momentum path, causality and incremental decoding."""

from __future__ import annotations

import pytest
import torch

from model_checks import assert_causal, shift_tokens, tiny_lm
from moelab.layers import MoE, RoutingContext

torch.set_num_threads(2)


def _pair(**kw):
    torch.manual_seed(0)
    return [MoE(8, 16, 4, 2, init_std=0.3, shared_experts=1, **kw).double() for _ in range(2)]


def _chain(layers, xs):
    ctx, ys = RoutingContext(), []
    for layer, x in zip(layers, xs, strict=True):
        ys.append(layer(x, context=ctx))
        ctx = ctx.next_layer()
    return ys, ctx


def test_off_is_the_plain_moe_and_passes_nothing():
    plain, off = _pair(), _pair(momentum=0.0, momentum_step=1.0)
    xs = [torch.randn(7, 8, dtype=torch.float64) for _ in range(2)]
    ys_plain, _ = _chain(plain, xs)
    ys_off, ctx = _chain(off, xs)
    for a, b in zip(ys_plain, ys_off, strict=True):
        assert torch.equal(a, b)
    assert ctx.get("momentum_smoe") is None


def test_hand_checked_two_layer_heavy_ball():
    """p_1 = f_1, p_2 = f_2 + μ·p_1; each layer returns γ·p (Teo & Nguyen 2024, §3)."""
    mu, gamma = 0.5, 0.8
    plain, heavy = _pair(), _pair(momentum=mu, momentum_step=gamma)
    xs = [torch.randn(7, 8, dtype=torch.float64) for _ in range(2)]
    (f1, f2), _ = _chain(plain, xs)
    (y1, y2), ctx = _chain(heavy, xs)
    torch.testing.assert_close(y1, gamma * f1)
    torch.testing.assert_close(y2, gamma * (f2 + mu * f1))
    torch.testing.assert_close(ctx.get("momentum_smoe"), f2 + mu * f1)
    # one scalar by hand: token 0, feature 0
    want = 0.8 * (f2[0, 0].item() + 0.5 * f1[0, 0].item())
    assert y2[0, 0].item() == pytest.approx(want, rel=1e-12)


def test_gradient_flows_through_the_momentum_path():
    heavy = _pair(momentum=0.7)
    xs = [torch.randn(7, 8, dtype=torch.float64) for _ in range(2)]
    (_, y2), _ = _chain(heavy, xs)
    g = torch.autograd.grad(y2.square().sum(), [heavy[0].experts.w13_EDF2, heavy[0].router.weight])
    assert all(x.abs().sum() > 0 for x in g)
    plain = _pair()
    (_, y2), _ = _chain(plain, xs)
    g = torch.autograd.grad(y2.square().sum(), [plain[0].experts.w13_EDF2], allow_unused=True)
    assert g[0] is None  # without momentum layer 2 does not read layer 1


def _lm(**ffn_kw):
    return tiny_lm(ffn=ffn_kw, n_layers=3).eval()


@pytest.mark.parametrize("ffn", [dict(momentum=0.7, momentum_step=1.5), dict(router="rmoe")])
def test_causal_and_incremental_decoding_matches(ffn):
    """Both carry state across depth, per token: later tokens never matter, and decoding one
    token at a time with a KV cache gives the full forward's logits."""
    model = _lm(**ffn)
    ids = torch.randint(0, 50, (2, 10))
    full = assert_causal(model, ids, shift_tokens(ids, 6, 50), atol=1e-5)
    cache = model.new_kv_cache(2)
    steps = [model(ids[:, :4], kv_cache=cache)]
    steps += [model(ids[:, t : t + 1], kv_cache=cache) for t in range(4, 10)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-5, atol=1e-5)


def test_bad_settings():
    with pytest.raises(
        ValueError, match=r"^momentum must be a number in \[0, 1\) \(0: off\), got 1.0$"
    ):
        MoE(8, 16, 4, 1, momentum=1.0)
    with pytest.raises(ValueError, match=r"^momentum_step must be a finite number > 0, got 0$"):
        MoE(8, 16, 4, 1, momentum_step=0)
    with pytest.raises(ValueError, match=r"ffn.momentum: must be a number in \[0, 1\)"):
        _lm(momentum=-0.1)
