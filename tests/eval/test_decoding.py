"""MoE-aware decoding: SCMoE's contrast (hand-computed), its neutral setting and test-time
rerouting's neutral setting (equal to plain decoding), one rerouting step against finite
differences, and the refusals."""

from __future__ import annotations

import math

import pytest
import torch

from model_checks import tiny_lm
from moelab.eval.continuation import continuation_scores
from moelab.eval.decoding import (
    RerouteDecoder,
    SCMoEDecoder,
    context_loss,
    make_decoder,
    reroute_step,
    scmoe_scores,
)
from moelab.model import generate

PROMPT = torch.tensor([[3, 17, 5, 9, 30], [8, 1, 44, 2, 7]])


def topk2():
    return tiny_lm("topk", top_k=2, init_std=0.2, max_seq_len=16).double().eval()


def test_scmoe_scores_match_a_hand_computation() -> None:
    strong, weak = [2.0, 1.0, 0.0, -3.0], [0.0, 2.0, 1.0, -1.0]
    alpha, beta = 0.3, 0.5

    def log_softmax(z):
        m = math.log(sum(math.exp(v) for v in z))
        return [v - m for v in z]

    ls, lw = log_softmax(strong), log_softmax(weak)
    p_max = max(math.exp(v) for v in ls)
    want = [
        (1 + beta) * s - beta * w if math.exp(s) >= alpha * p_max else -math.inf
        for s, w in zip(ls, lw, strict=True)
    ]
    got = scmoe_scores(torch.tensor([strong]), torch.tensor([weak]), alpha, beta)[0].tolist()
    assert got[2:] == [-math.inf, -math.inf]  # p = e^-2 ≈ 0.135 and e^-5 of the top: outside
    assert got[:2] == pytest.approx(want[:2], abs=1e-6)
    assert want[2:] == [-math.inf, -math.inf]


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_scmoe_neutral_setting_is_plain_decoding(temperature: float) -> None:
    model = topk2()
    plain = generate(model, PROMPT, 6, temperature=temperature, seed=3)
    neutral = SCMoEDecoder(model, alpha=0.0, beta=0.0)
    got = generate(model, PROMPT, 6, temperature=temperature, seed=3, decoder=neutral)
    assert torch.equal(got, plain)


def test_scmoe_weak_pass_routes_each_token_to_its_rank_two_expert() -> None:
    model = topk2()
    moe = model.routed_layers()[0]
    x = torch.randn(7, moe.d_model, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    seen = []
    moe.routing_observer = lambda layer, decision, x_TD: seen.append(decision)
    moe.router.inference_rank = 2
    with torch.no_grad():
        moe(x)
    moe.router.inference_rank = None
    second = moe.router.logits(x).argsort(dim=-1, descending=True)[:, 1]
    (decision,) = seen
    assert decision.token_idx_N.tolist() == list(range(7))
    assert decision.expert_idx_N.tolist() == second.tolist()


def test_scmoe_changes_decoding_when_on() -> None:
    model = topk2()
    plain = generate(model, PROMPT, 8, temperature=0)
    contrast = generate(model, PROMPT, 8, temperature=0, decoder=SCMoEDecoder(model, 0.0, 5.0))
    assert not torch.equal(plain, contrast)


def test_scmoe_refuses_a_router_that_cannot_route_by_rank() -> None:
    model = tiny_lm("relu", init_std=0.2, max_seq_len=16).eval()
    with pytest.raises(ValueError) as err:
        make_decoder(model, "scmoe")
    assert "\n" not in str(err.value)
    assert "router 'relu' cannot route each token to its expert of one rank" in str(err.value)


@pytest.mark.parametrize("router", ["topk", "relu"])
def test_rerouting_with_zero_steps_is_plain_decoding(router: str) -> None:
    model = tiny_lm(router, top_k=1, init_std=0.2, max_seq_len=16).double().eval()
    plain = generate(model, PROMPT, 6, temperature=0)
    got = generate(model, PROMPT, 6, temperature=0, decoder=RerouteDecoder(model, steps=0))
    assert torch.equal(got, plain)


@pytest.mark.parametrize("router", ["topk", "relu"])
def test_one_rerouting_step_follows_the_negative_gradient(router: str) -> None:
    """``o_new − o_old = −lr · ∂L/∂o``, the derivative taken by central finite differences of the
    context loss in every offset coordinate."""
    model = tiny_lm(router, top_k=1, init_std=0.2, max_seq_len=16).double().eval()
    routers = [layer.router for layer in model.routed_layers()]
    gen = torch.Generator().manual_seed(4)
    offsets = [torch.randn(r.num_experts, dtype=torch.float64, generator=gen) for r in routers]
    for r, o in zip(routers, offsets, strict=True):
        r.logit_offset = o
    before = [o.clone() for o in offsets]
    eps, lr = 1e-3, 0.05  # RMSNorm rounds to float32: smaller steps see its noise
    fd = []
    with torch.no_grad():
        for o in offsets:
            g = torch.zeros_like(o)
            for i in range(o.numel()):
                o[i] += eps
                up = float(context_loss(model, PROMPT, None))
                o[i] -= 2 * eps
                down = float(context_loss(model, PROMPT, None))
                o[i] += eps
                g[i] = (up - down) / (2 * eps)
            fd.append(g)
    assert any(float(g.abs().max()) > 1e-4 for g in fd)  # the step has something to follow
    reroute_step(model, offsets, PROMPT, None, lr)
    for o, o0, g in zip(offsets, before, fd, strict=True):
        torch.testing.assert_close(o - o0, -lr * g, rtol=2e-3, atol=lr * 5e-5)


def test_rerouting_lowers_the_context_loss_and_leaves_no_offset_after_remove() -> None:
    model = topk2()
    decoder = RerouteDecoder(model, steps=3, lr=0.5, interval=4)
    generate(model, PROMPT, 6, temperature=0, decoder=decoder)
    assert decoder.losses[2] < decoder.losses[0]
    decoder.remove()
    assert all(layer.router.logit_offset is None for layer in model.routed_layers())


def test_continuation_scores_of_plain_decoding_are_the_teacher_forced_loss() -> None:
    model = topk2()
    ids = torch.randint(0, 50, (3, 10), generator=torch.Generator().manual_seed(5))
    got = continuation_scores(lambda: make_decoder(model, "plain"), [ids], prompt_len=4)
    with torch.no_grad():
        logp = torch.log_softmax(model(ids), dim=-1)[:, 3:-1]
    want = -logp.gather(2, ids[:, 4:, None]).mean()
    assert got["nll"] == pytest.approx(float(want), rel=1e-9)
    assert got["tokens"] == 18 and got["outside"] == 0.0
