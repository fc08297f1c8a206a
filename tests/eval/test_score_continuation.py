"""Teacher-forced scoring of one continuation (``moelab lm-eval``'s requests): the decoder path
of plain decoding against the single forward pass, the neutral settings of SCMoE and rerouting
against plain, and an SCMoE score against its scores computed from full forward passes of the
strong and the weak routing."""

from __future__ import annotations

import math

import pytest
import torch

from model_checks import tiny_lm
from moelab.eval.continuation import score_continuation
from moelab.eval.decoding import SCMoEDecoder, make_decoder, scmoe_scores
from moelab.model import generate


def topk2(router: str = "topk"):
    return tiny_lm(router, top_k=2, init_std=0.2, max_seq_len=12).double().eval()


def ids(n: int, seed: int) -> list[int]:
    return torch.randint(0, 50, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


@pytest.mark.parametrize("router", ["topk", "relu"])
@pytest.mark.parametrize(("length", "n"), [(2, 1), (7, 3), (12, 8)])
def test_plain_decoder_path_equals_the_forward_path(router: str, length: int, n: int) -> None:
    model = topk2(router)
    seq = ids(length, seed=length)
    forward = score_continuation(model, seq, n)
    decoded = score_continuation(model, seq, n, lambda: make_decoder(model, "plain"))
    assert decoded[0] == pytest.approx(forward[0], rel=1e-10, abs=1e-10)
    assert decoded[1] == forward[1]


@pytest.mark.parametrize(
    ("decoding", "options"),
    [("scmoe", {"scmoe_alpha": 0.0, "scmoe_beta": 0.0}), ("reroute", {"reroute_steps": 0})],
)
def test_neutral_settings_score_like_plain(decoding: str, options: dict) -> None:
    model = topk2()
    for seed in range(3):
        seq = ids(10, seed)
        plain = score_continuation(model, seq, 4)
        got = score_continuation(model, seq, 4, lambda: make_decoder(model, decoding, **options))
        assert got[0] == pytest.approx(plain[0], rel=1e-10) and got[1] == plain[1]


def _scmoe_by_forward(model, seq: list[int], n: int, alpha: float, beta: float) -> float:
    """Σ log softmax(scmoe_scores(strong, weak)) of the true tokens, the strong and weak logits
    from one full forward each (the weak one with every router at rank 2), no KV cache."""
    x = torch.tensor([seq[:-1]])
    routers = [layer.router for layer in model.routed_layers()]
    with torch.no_grad():
        strong = model(x)[0]
        for r in routers:
            r.inference_rank = 2
        try:
            weak = model(x)[0]
        finally:
            for r in routers:
                r.inference_rank = None
    total = 0.0
    for p in range(len(seq) - 1 - n, len(seq) - 1):
        scores = scmoe_scores(strong[p : p + 1], weak[p : p + 1], alpha, beta)[0]
        total += float(torch.log_softmax(scores, dim=-1)[seq[p + 1]])
    return total


@pytest.mark.parametrize(("alpha", "beta"), [(0.0, 0.7), (1e-4, 2.0)])
def test_scmoe_score_matches_its_scores_from_full_forwards(alpha: float, beta: float) -> None:
    model = topk2()
    seq = ids(9, seed=11)
    want = _scmoe_by_forward(model, seq, 3, alpha, beta)
    got, _ = score_continuation(model, seq, 3, lambda: SCMoEDecoder(model, alpha, beta))
    assert math.isfinite(want)
    assert got == pytest.approx(want, rel=1e-9)
    assert got != pytest.approx(score_continuation(model, seq, 3)[0], rel=1e-3)  # it contrasts


def test_scmoe_excluded_token_is_minus_inf_and_its_own_argmax_is_greedy() -> None:
    model = topk2()
    prompt = ids(5, seed=2)
    with torch.no_grad():
        worst = int(model(torch.tensor([prompt]))[0, -1].argmin())  # below α·max for α = 0.5
    seq = [*prompt, worst, 7]
    make = lambda: SCMoEDecoder(model, 0.5, 0.5)  # noqa: E731
    assert score_continuation(model, seq, 2, make) == (-math.inf, False)
    greedy = generate(model, torch.tensor([prompt]), 4, temperature=0, decoder=make())[0].tolist()
    logp, is_greedy = score_continuation(model, greedy, 4, make)
    assert is_greedy and math.isfinite(logp)
    changed = [*greedy[:-1], (greedy[-1] + 1) % 50]
    assert score_continuation(model, changed, 4, make)[1] is False
