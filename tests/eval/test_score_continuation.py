"""Teacher-forced scoring of one continuation (``moelab lm-eval``'s requests): the decoder path
of plain decoding against the single forward pass, the neutral settings of SCMoE and rerouting
against plain, and an SCMoE score against its scores computed from full forward passes of the
strong and the weak routing; requests sharing a prompt (:func:`score_requests`) against each
scored alone, and its adaptation counted."""

from __future__ import annotations

import math

import pytest
import torch

import moelab.eval.decoding as decoding_module
from model_checks import tiny_lm
from moelab.eval.continuation import score_continuation, score_requests
from moelab.eval.decoding import SCMoEDecoder, make_decoder, scmoe_scores
from moelab.model import generate
from moelab.model.generate import PlainDecoder, left_pad, left_padding


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


SHARING = [
    ("scmoe", {"scmoe_alpha": 1e-3, "scmoe_beta": 0.7}),
    ("reroute", {"reroute_steps": 2, "reroute_lr": 0.5, "reroute_interval": 2}),
    ("reroute", {"reroute_steps": 1, "reroute_lr": 0.5, "reroute_interval": 16}),
    ("plain", {}),
]


def _questions() -> list[tuple[list[int], int]]:
    """Two prompts' answer choices of lengths 1 to 5, interleaved, plus a lone request."""
    a, b = ids(5, seed=1), ids(3, seed=2)
    reqs = []
    for k, length in enumerate([1, 3, 5, 2]):
        reqs.append(([*a, *ids(length, seed=10 + k)], length))
        reqs.append(([*b, *ids(length + 1, seed=20 + k)], length + 1))
    reqs.insert(3, (ids(7, seed=3), 2))
    return reqs


@pytest.mark.parametrize(("decoding", "options"), SHARING)
def test_requests_sharing_a_prompt_score_exactly_as_each_alone(decoding, options) -> None:
    """Forked decoders (KV caches, context and offsets copied) give the very floats of a fresh
    decoder per request, re-adaptations inside the continuation (interval 2) included."""
    model = topk2()
    make = lambda: make_decoder(model, decoding, **options)  # noqa: E731
    reqs = _questions()
    alone = [score_continuation(model, seq, n, make) for seq, n in reqs]
    shared = score_requests(model, reqs, make)
    assert shared == alone  # same floats, same is_greedy, in the requests' order
    assert len({s for s, _ in alone}) == len(reqs)  # the requests do differ
    routers = [layer.router for layer in model.routed_layers()]
    assert all(getattr(r, "logit_offset", None) is None for r in routers)  # taken off


def test_rerouting_adapts_once_per_prompt(monkeypatch) -> None:
    model = topk2()
    calls = []
    real = decoding_module.reroute_step

    def counted(*args, **kw):
        calls.append(args[2].shape[1])  # the length of the context adapted on
        return real(*args, **kw)

    monkeypatch.setattr(decoding_module, "reroute_step", counted)
    make = lambda: make_decoder(model, "reroute", reroute_steps=3, reroute_interval=16)  # noqa: E731
    reqs = _questions()
    score_requests(model, reqs, make)
    assert calls == [5] * 3 + [3] * 3 + [7 - 2] * 3  # 3 steps per distinct prompt, first-seen order
    calls.clear()
    for seq, n in reqs:
        score_continuation(model, seq, n, make)
    assert len(calls) == 3 * len(reqs)  # alone: every request adapts its prompt again


def test_forked_cache_with_left_padding_decodes_as_the_original() -> None:
    model = topk2()
    prompts = [ids(4, seed=5), ids(2, seed=6)]
    x, mask = left_pad(prompts)
    pad = left_padding(mask, tuple(x.shape))
    steps = torch.tensor([[3, 9], [11, 1], [4, 4]])
    with torch.no_grad():
        original = PlainDecoder(model)
        original.prefill(x, pad, 10)
        fork = original.fork(8)
        got = [fork.step(s) for s in steps]
        want = [original.step(s) for s in steps]  # the original is untouched by its fork
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=0, atol=0)
