"""SparseMixer-v2 (GRIN): the sparsity mask and gates by hand, sampling and the Heun scale, the
custom gradient against a finite-difference derivation and against plain TopK, loop reference,
accounting, causality, bad settings."""

from __future__ import annotations

import math

import pytest
import torch

from moelab.layers import MoE
from moelab.layers.routers.sparsemixer import SparseMixerGate, far_from_top, pick_one
from router_checks import assert_router_causal, loop_moe, observed_gates

torch.set_num_threads(2)


def _hand_moe(logits_rows, **options) -> MoE:
    """E=4, k=2; one-hot token t has router logits ``logits_rows[t]``."""
    moe = MoE(4, 8, 4, 2, router="sparsemixer", **options).double()
    with torch.no_grad():
        w = torch.zeros(4, 4, dtype=torch.float64)
        w[:, : len(logits_rows)] = torch.tensor(logits_rows, dtype=torch.float64).T
        moe.router.weight.copy_(w)
    return moe


def test_hand_example_mask_and_greedy_gates_at_evaluation():
    # token 0: logits [2, 1.99, 0, -1]; mask_eps 0.01 keeps e with (2 - z)/max(|z|, 2) <= 0.02:
    #   expert 1 (0.005) stays, 2 and 3 (1.0, 1.5) are masked. Slot 1: argmax 0, gate
    #   softmax([2, 1.99])_0. Slot 2 (expert 0 removed): best 1.99; expert 2: 1.99/1.99 > 0.02
    #   masked -> only expert 1 left, gate 1.
    # token 1: logits [1, 3, 2.97, 2.95]: slot 1 keeps {1, 2, 3} ((3-2.95)/3 = 0.0167 <= 0.02),
    #   picks 1; slot 2 over {2, 3}: (2.97-2.95)/2.97 = 0.0067 -> both kept, picks 2.
    moe = _hand_moe([[2.0, 1.99, 0.0, -1.0], [1.0, 3.0, 2.97, 2.95]]).eval()
    x = torch.eye(4, dtype=torch.float64)[:2]
    e = math.exp
    s1 = e(3) + e(2.97) + e(2.95)
    assert observed_gates(moe, x) == [
        {0: round(e(2) / (e(2) + e(1.99)), 12), 1: 1.0},
        {1: round(e(3) / s1, 12), 2: round(e(2.97) / (e(2.97) + e(2.95)), 12)},
    ]
    mask = far_from_top(torch.tensor([[2.0, 1.99, 0.0, -1.0]]), 0.01)
    assert mask.tolist() == [[False, False, True, True]]


def test_sampling_follows_the_masked_softmax_and_the_heun_scale():
    torch.manual_seed(0)
    scores = torch.tensor([[1.0, 0.99, 0.98, -5.0]]).expand(40000, 4)
    probs, choice, scale = pick_one(scores, 0.01, training=True)
    want = torch.tensor([1.0, 0.99, 0.98]).softmax(-1)
    freq = torch.bincount(choice[:, 0], minlength=4).double() / 40000
    torch.testing.assert_close(freq[:3], want.double(), atol=0.01, rtol=0)
    assert freq[3] == 0  # masked: never sampled
    greedy = choice[:, 0] == 0
    assert torch.all(scale[greedy] == 1.0)
    third = (scale[~greedy] == 1 / 3).double().mean()
    assert abs(third - 0.75) < 0.01 and torch.all((scale == 1.0) | (scale == 1 / 3))


def test_custom_gradient_matches_finite_differences_of_the_estimator():
    """The router gradient is Σ_slots g_slot · ∂π^slot_D/∂z with each slot's choice (and mask)
    held fixed: checked against central differences of that function of the logits."""
    torch.manual_seed(3)
    moe = MoE(6, 8, 5, 2, router="sparsemixer", init_std=0.3, mask_eps=0.5).double().train()
    x = torch.randn(7, 6, dtype=torch.float64)
    seen = []
    moe.routing_observer = lambda layer, decision, x_TD: seen.append(decision)
    moe(x)
    d = seen[0]
    g_N = torch.randn(d.weight_N.shape, dtype=torch.float64)
    (grad_W,) = torch.autograd.grad((d.weight_N * g_N).sum(), moe.router.weight)
    token_N, expert_N = d.token_idx_N, d.expert_idx_N
    slot_N = torch.arange(token_N.numel()) % 2  # assignments are token-major, slot order

    def estimator(w_ED: torch.Tensor) -> torch.Tensor:
        z_TE = x @ w_ED.T
        total = torch.zeros((), dtype=torch.float64)
        for n in range(token_N.numel()):
            t, e, slot = int(token_N[n]), int(expert_N[n]), int(slot_N[n])
            z = z_TE[t].clone()
            if slot == 1:  # the first slot's expert is removed
                z[int(expert_N[n - 1])] = float("-inf")
            mask = far_from_top(z[None].detach(), 0.5)[0]
            pi = z.masked_fill(mask, float("-inf")).softmax(-1)
            total = total + g_N[n] * pi[e]
        return total

    w0 = moe.router.weight.detach().clone()
    fd = torch.zeros_like(w0)
    h = 1e-6
    for i in range(w0.shape[0]):
        for j in range(w0.shape[1]):
            wp, wm = w0.clone(), w0.clone()
            wp[i, j] += h
            wm[i, j] -= h
            fd[i, j] = (estimator(wp) - estimator(wm)) / (2 * h)
    torch.testing.assert_close(grad_W, fd, rtol=1e-6, atol=1e-9)


def test_gradient_differs_from_plain_topk_exactly_by_the_mask_and_the_scale():
    """Same gate, same greedy choices (evaluation, no masking): SparseMixer's slot-1 gradient is
    TopK's (softmax over all E at the choice). With a mask, the softmax is over the unmasked
    experts only; with the Heun scale c the forward is c·π_D but the gradient is not scaled."""
    torch.manual_seed(4)
    sm = MoE(6, 8, 5, 1, router="sparsemixer", mask_eps=1e9).double().eval()  # nothing masked
    tk = MoE(6, 8, 5, 1, router="topk").double()
    tk.load_state_dict(sm.state_dict())
    x = torch.randn(9, 6, dtype=torch.float64)
    y_sm, y_tk = sm(x), tk(x)
    torch.testing.assert_close(y_sm, y_tk)
    (g_sm,) = torch.autograd.grad(y_sm.sum(), sm.router.weight)
    (g_tk,) = torch.autograd.grad(y_tk.sum(), tk.router.weight)
    torch.testing.assert_close(g_sm, g_tk)
    # Heun scale: forward c·π_D, gradient of π_D (not c·∂π_D)
    logits = torch.randn(1, 5, dtype=torch.float64, requires_grad=True)
    probs = logits.detach().softmax(-1)
    choice = torch.tensor([[2]])
    out = SparseMixerGate.apply(logits, probs, choice, torch.tensor([[1 / 3]], dtype=torch.float64))
    torch.testing.assert_close(out, probs[:, 2:3] / 3)
    (g,) = torch.autograd.grad(out.sum(), logits)
    (g_plain,) = torch.autograd.grad(logits.softmax(-1)[0, 2], logits)
    torch.testing.assert_close(g, g_plain)


def test_matches_per_token_loop_reference_at_evaluation():
    torch.manual_seed(0)
    moe = MoE(8, 16, 6, 2, router="sparsemixer", init_std=0.5, mask_eps=0.2).double().eval()
    x = torch.randn(20, 8, dtype=torch.float64, requires_grad=True)
    z = (x @ moe.router.weight.T).detach()
    gates = []
    for t in range(20):
        row, chosen = z[t].tolist(), {}
        for _ in range(2):
            top = max(v for v in row if v != -math.inf)
            kept = [v != -math.inf and (top - v) / max(abs(v), top) <= 0.4 for v in row]
            denom = sum(math.exp(v) for v, k in zip(row, kept, strict=True) if k)
            best = max(range(6), key=lambda e: row[e] if kept[e] else -math.inf)
            chosen[best] = math.exp(row[best]) / denom
            row[best] = -math.inf
        gates.append(chosen)
    y = moe(x)
    as_tensors = [{e: torch.tensor(w, dtype=torch.float64) for e, w in g.items()} for g in gates]
    y_ref = loop_moe(moe, x, as_tensors)
    torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-12)
    # the experts' gradients agree (the loop's gates are constants: the router's path differs)
    target = torch.randn_like(y)
    experts = list(moe.experts.parameters())
    got = torch.autograd.grad((y * target).sum(), experts)
    want = torch.autograd.grad((y_ref * target).sum(), experts)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


def test_dropless_accounting_and_padding():
    torch.manual_seed(1)
    moe = MoE(8, 16, 4, 2, router="sparsemixer", init_std=0.5, mask_eps=0.5).train()
    x = torch.randn(2, 6, 8)
    mask = torch.ones(2, 6, dtype=torch.bool)
    mask[1, 3:] = False
    y = moe(x, token_mask=mask)
    stats = moe.last_stats
    assert int(stats.tokens_per_expert.sum()) == 9 * 2 == int(stats.active_sum)
    assert stats.active_min == stats.active_max == 2 and int(stats.dropped) == 0
    assert torch.equal(y[1, 3:], torch.zeros_like(y[1, 3:]))
    # (with GRIN's mask_eps=0.01, logits this small leave only the top expert unmasked: π_D = 1
    # and the router gets no gradient from the gates; mask_eps=0.5 keeps several)
    y.sum().backward()
    assert moe.router.weight.grad.abs().sum() > 0


def test_causal_through_the_model():
    assert_router_causal("sparsemixer")


@pytest.mark.parametrize(
    "options, k, match",
    [
        (dict(), 3, "top_k must be 1 or 2 for router 'sparsemixer', got 3"),
        (dict(mask_eps=-1.0), 2, "mask_eps must be a finite number >= 0"),
        (dict(balance_coef=float("inf")), 2, "balance_coef must be a finite number >= 0"),
    ],
)
def test_bad_settings_raise_one_clear_error(options, k, match):
    with pytest.raises(ValueError, match=match):
        MoE(8, 16, 4, k, router="sparsemixer", **options)
