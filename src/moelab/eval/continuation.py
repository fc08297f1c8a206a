"""How well a decoding mode predicts real text: teacher-forced scoring of a true continuation
under the mode's own next-token distribution.

:func:`teacher_forced_logprobs` is the one loop: the decoder prefills the prompt; then, for each
true next token, the decoder's scores are turned into a distribution (softmax in float64; SCMoE's
tokens outside its plausibility set have probability 0, log-probability ``-inf``), the true
token's log-probability and whether it is the argmax are yielded, and the true token (not the
predicted one) is fed to the decoder. :func:`continuation_scores` (``moelab eval-decoding``,
validation windows), :func:`score_continuation` (one ``moelab lm-eval`` request) and
:func:`score_requests` (all of them, a prompt's prefill forked for its continuations) read it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Protocol

import torch
from torch import Tensor

from moelab.model.generate import Decoder
from moelab.model.transformer import TransformerLM


@torch.no_grad()
def teacher_forced_logprobs(
    decoder: Decoder, ids_BL: Tensor, prompt_len: int
) -> Iterator[tuple[Tensor, Tensor]]:
    """For each position ``t`` in ``prompt_len .. L-1`` of ``ids_BL`` (``[B, L]``): the float64
    log-probability ``[B]`` of the true token ``ids_BL[:, t]`` under ``decoder`` given the tokens
    before it (``-inf`` where the mode excludes it), and whether it is the argmax ``[B]``. The
    decoder's caches hold the ``L - 1`` tokens it is fed; the caller removes the decoder."""
    length = ids_BL.shape[1]
    if not 1 <= prompt_len < length:
        raise ValueError(
            f"prompt_len ({prompt_len}) must be in [1, {length - 1}] (window {length})"
        )
    scores_BV = decoder.prefill(ids_BL[:, :prompt_len], None, length - 1)
    yield from _forced(decoder, scores_BV, ids_BL, prompt_len)


def _forced(
    decoder: Decoder, scores_BV: Tensor, ids_BL: Tensor, prompt_len: int
) -> Iterator[tuple[Tensor, Tensor]]:
    """:func:`teacher_forced_logprobs` after the prefill: ``scores_BV`` predict position
    ``prompt_len`` of ``ids_BL``."""
    length = ids_BL.shape[1]
    for t in range(prompt_len, length):
        true_B = ids_BL[:, t]
        logp_BV = torch.log_softmax(scores_BV.double(), dim=-1)
        yield logp_BV.gather(1, true_B[:, None])[:, 0], scores_BV.argmax(-1) == true_B
        if t + 1 < length:
            scores_BV = decoder.step(true_B)


@torch.no_grad()
def continuation_scores(
    make: Callable[[], Decoder], windows: Iterable[Tensor], prompt_len: int
) -> dict[str, float]:
    """Mean ``nll`` (nats per continuation token), ``accuracy`` (argmax is the true token),
    ``outside`` (fraction of true tokens with probability 0) and ``tokens`` over ``windows``
    (each ``[B, L]``, ``L > prompt_len``); a fresh decoder from ``make`` per window batch. A true
    token a mode gives probability 0 is counted in ``outside`` and left out of ``nll``."""
    nll_sum, inside, correct, total = 0.0, 0, 0, 0
    for ids_BL in windows:
        decoder = make()
        try:
            for logp_B, hit_B in teacher_forced_logprobs(decoder, ids_BL, prompt_len):
                finite_B = torch.isfinite(logp_B)
                nll_sum -= float(logp_B[finite_B].sum())
                inside += int(finite_B.sum())
                correct += int(hit_B.sum())
                total += logp_B.numel()
        finally:
            decoder.remove()
    return {
        "nll": nll_sum / inside if inside else math.nan,
        "accuracy": correct / total if total else math.nan,
        "outside": 1.0 - inside / total if total else math.nan,
        "tokens": float(total),
    }


@torch.no_grad()
def score_continuation(
    model: TransformerLM,
    ids: list[int],
    n: int,
    make: Callable[[], Decoder] | None = None,
) -> tuple[float, bool]:
    """The log-likelihood of the last ``n`` tokens of ``ids`` given the ones before, and whether
    each is the argmax (lm-eval's ``(logprob, is_greedy)``). ``make`` None: the model's own
    distribution from one forward pass; else a fresh decoder from ``make``, teacher-forced
    (:func:`teacher_forced_logprobs`): ``-inf`` if the mode excludes any true token."""
    if not 1 <= n < len(ids):
        raise ValueError(f"n ({n}) must be in [1, {len(ids) - 1}] ({len(ids)} tokens)")
    device = next(model.parameters()).device
    ids_1L = torch.tensor([ids], device=device)
    if make is None:
        logp_NV = torch.log_softmax(model(ids_1L[:, :-1])[0, -n:].double(), dim=-1)
        target_N = ids_1L[0, -n:]
        greedy = bool((logp_NV.argmax(-1) == target_N).all())
        return float(logp_NV.gather(1, target_N[:, None]).sum()), greedy
    decoder = make()
    try:
        return _summed(teacher_forced_logprobs(decoder, ids_1L, len(ids) - n))
    finally:
        decoder.remove()


def _summed(logprobs: Iterable[tuple[Tensor, Tensor]]) -> tuple[float, bool]:
    """lm-eval's ``(logprob, is_greedy)`` of one row from its per-token values."""
    total, greedy = 0.0, True
    for logp_B, hit_B in logprobs:
        total += float(logp_B[0])
        greedy = greedy and bool(hit_B[0])
    return total, greedy


class ForkableDecoder(Decoder, Protocol):
    """A decoder that can be copied after its prefill (every moelab decoder can)."""

    def fork(self, max_len: int) -> ForkableDecoder:
        """A decoder going on from this one's state, with room for ``max_len`` positions."""
        ...


@torch.no_grad()
def score_requests(
    model: TransformerLM,
    requests: Sequence[tuple[list[int], int]],
    make: Callable[[], ForkableDecoder] | None = None,
) -> list[tuple[float, bool]]:
    """:func:`score_continuation` of each ``(ids, n)`` in ``requests``, in their order, with the
    same values; under a decoder (``make``), requests with the same prompt (``ids[:-n]``: the
    answer choices of one question) share its prefill, for rerouting its test-time adaptation:
    one decoder prefills the prompt once with room for the longest continuation and is forked
    (KV caches, context and adapted offsets copied, each fork with the room a lone decoder would
    get) per continuation. ``make`` None: one forward pass per request."""
    if make is None:
        return [score_continuation(model, ids, n) for ids, n in requests]
    for ids, n in requests:
        if not 1 <= n < len(ids):
            raise ValueError(f"n ({n}) must be in [1, {len(ids) - 1}] ({len(ids)} tokens)")
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, (ids, n) in enumerate(requests):
        groups.setdefault(tuple(ids[:-n]), []).append(i)
    device = next(model.parameters()).device
    out: list[tuple[float, bool]] = [(0.0, False)] * len(requests)
    for prompt, members in groups.items():
        longest = max(len(requests[i][0]) for i in members)
        decoder = make()
        try:
            scores_1V = decoder.prefill(torch.tensor([prompt], device=device), None, longest - 1)
            for i in members:
                ids = requests[i][0]
                fork = decoder.fork(len(ids) - 1)
                try:
                    ids_1L = torch.tensor([ids], device=device)
                    out[i] = _summed(_forced(fork, scores_1V, ids_1L, len(prompt)))
                finally:
                    fork.remove()
        finally:
            decoder.remove()
    return out
