"""MoE-aware decoding: next-token distributions that use the routing itself, behind
:class:`moelab.model.generate.Decoder`'s two calls (``prefill``, ``step``).

* :class:`SCMoEDecoder`, Self-Contrast MoE (Shi et al. 2024, "Unchosen Experts Can Contribute
  Too: Unleashing MoE Models' Power by Self-Contrast", arXiv 2405.14507): the model's own (strong)
  logits contrasted with those of a weak pass that routes each token to its expert of rank
  ``weak_rank`` alone (:func:`scmoe_scores`).
* :class:`RerouteDecoder`, test-time rerouting (Su et al. 2025, "Rewiring Experts on the Fly:
  Continuous Rerouting for Better Online Adaptation in Mixture-of-Expert Models"): at the prompt
  and then every ``interval`` new tokens, a few gradient steps on additive router-logit vectors
  (one per routed layer) against the language-model loss of the context so far, then decoding
  with them (:func:`reroute_step`).
"""

from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from torch import Tensor

from moelab.model.generate import PlainDecoder
from moelab.model.transformer import TransformerLM

DECODINGS = ("plain", "scmoe", "reroute")


def scmoe_scores(strong_BV: Tensor, weak_BV: Tensor, alpha: float, beta: float) -> Tensor:
    """SCMoE's next-token scores (Shi et al. 2024, eq. 3-4):

    ``s(x) = (1 + β)·log p_strong(x) − β·log p_weak(x)`` for ``x`` in the adaptive plausibility
    set ``V = {x : p_strong(x) ≥ α · max_w p_strong(w)}``, ``−inf`` outside it. ``β = 0`` and
    ``α = 0`` give ``log p_strong``: plain decoding. Sampling (or argmax) is over these scores.
    """
    logp_s = torch.log_softmax(strong_BV.double(), dim=-1)
    logp_w = torch.log_softmax(weak_BV.double(), dim=-1)
    scores = (1.0 + beta) * logp_s - beta * logp_w
    if alpha > 0:
        cutoff = logp_s.max(dim=-1, keepdim=True).values + math.log(alpha)
        scores = scores.masked_fill(logp_s < cutoff, float("-inf"))
    return scores.to(strong_BV.dtype)


def rank_routers(model: TransformerLM) -> list[torch.nn.Module]:
    """The routers of ``model``'s routed layers, refused in one line unless every one routes by
    rank (its class's ``routes_by_rank`` capability)."""
    layers = model.routed_layers()
    routers = [getattr(layer, "router", None) for layer in layers]
    if not routers or any(r is None for r in routers):
        raise ValueError("--decoding scmoe: needs a model whose routed layers are MoE layers")
    for router in routers:
        line = type(router).refusal("routes_by_rank")
        if line is not None:
            raise ValueError(f"--decoding scmoe: {line}")
    return routers


class SCMoEDecoder:
    """Self-Contrast MoE: a strong pass (the trained routing) and a weak pass (rank-``weak_rank``
    routing, each with its own KV cache), combined by :func:`scmoe_scores`. The paper's setting
    for top-2 Mixtral: ``weak_rank=2``, ``alpha=0.1``, ``beta`` tuned per task (0.5 is typical)."""

    def __init__(
        self, model: TransformerLM, alpha: float = 0.1, beta: float = 0.5, weak_rank: int = 2
    ) -> None:
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"--scmoe-alpha must be in [0, 1], got {alpha}")
        if not beta >= 0.0:
            raise ValueError(f"--scmoe-beta must be >= 0, got {beta}")
        self.routers = rank_routers(model)
        experts = min(r.num_experts for r in self.routers)
        if not 1 <= weak_rank <= experts:
            raise ValueError(f"--scmoe-weak-rank must be in [1, {experts}], got {weak_rank}")
        self.alpha, self.beta, self.weak_rank = alpha, beta, weak_rank
        self.strong, self.weak = PlainDecoder(model), PlainDecoder(model)

    def _weak(self, call, *args) -> Tensor:
        for router in self.routers:
            router.inference_rank = self.weak_rank
        try:
            return call(*args)
        finally:
            for router in self.routers:
                router.inference_rank = None

    def prefill(self, ids_BL: Tensor, pad_B: Tensor | None, max_len: int) -> Tensor:
        strong = self.strong.prefill(ids_BL, pad_B, max_len)
        if self.beta == 0 and self.alpha == 0:  # neutral: the weak pass cannot change anything
            return strong
        weak = self._weak(self.weak.prefill, ids_BL, pad_B, max_len)
        return scmoe_scores(strong, weak, self.alpha, self.beta)

    def step(self, next_B: Tensor) -> Tensor:
        strong = self.strong.step(next_B)
        if self.beta == 0 and self.alpha == 0:
            return strong
        weak = self._weak(self.weak.step, next_B)
        return scmoe_scores(strong, weak, self.alpha, self.beta)

    def fork(self, max_len: int) -> SCMoEDecoder:
        """A decoder going on from this one's state (both KV caches copied, room for
        ``max_len``), this one untouched: the prompt's two passes shared by its continuations."""
        new = copy.copy(self)
        new.strong = self.strong.fork(max_len)
        new.weak = self.weak.fork(max_len)
        return new

    def remove(self) -> None:
        """Nothing stays on the model (the weak routing is set only around its own calls)."""


def context_loss(model: TransformerLM, ids_BL: Tensor, pad_B: Tensor | None) -> Tensor:
    """Mean next-token cross-entropy of the context itself (padding neither read nor scored):
    rerouting's self-supervised objective."""
    cache = model.new_kv_cache(ids_BL.shape[0], max_len=ids_BL.shape[1])
    if pad_B is not None:
        cache.set_left_padding(pad_B)
    logits_BLV = model(ids_BL, kv_cache=cache)
    logits_BLV = logits_BLV.to(torch.promote_types(logits_BLV.dtype, torch.float32))
    loss_BL = F.cross_entropy(logits_BLV[:, :-1].transpose(1, 2), ids_BL[:, 1:], reduction="none")
    if pad_B is None:
        return loss_BL.mean()
    steps = torch.arange(1, ids_BL.shape[1], device=ids_BL.device)
    real_BL = steps[None, :] > pad_B[:, None]  # the target is real and so is its input
    return (loss_BL * real_BL).sum() / real_BL.sum().clamp_min(1)


def reroute_step(
    model: TransformerLM, offsets: list[Tensor], ids_BL: Tensor, pad_B: Tensor | None, lr: float
) -> Tensor:
    """One gradient step ``o ← o − lr · ∂L/∂o`` on the routers' additive logit vectors ``o``
    (installed on the routers as ``logit_offset``), ``L`` the :func:`context_loss`; every model
    parameter stays as it is. Returns the loss before the step."""
    for o in offsets:
        o.requires_grad_(True)
    with torch.enable_grad():
        loss = context_loss(model, ids_BL, pad_B)
        grads = torch.autograd.grad(loss, offsets, allow_unused=True)
    with torch.no_grad():
        for o, g in zip(offsets, grads, strict=True):
            if g is not None:
                o.sub_(lr * g)
    for o in offsets:
        o.requires_grad_(False)
    return loss.detach()


class RerouteDecoder:
    """Test-time rerouting: ``steps`` gradient steps (rate ``lr``) on one additive router-logit
    vector per routed layer at the prompt and again every ``interval`` new tokens, each followed by
    a fresh prefill of the whole context with the new offsets; plain KV-cache steps between.

    Simplified from the paper: every routed layer is adapted (the paper picks layers), by plain
    gradient descent on one vector per layer shared by all tokens and rows, from the loss of the
    context including the generated tokens. ``steps=0`` is plain decoding. The offsets are left
    on the routers after generation (:meth:`remove` takes them off)."""

    def __init__(
        self, model: TransformerLM, steps: int = 2, lr: float = 0.1, interval: int = 16
    ) -> None:
        if steps < 0:
            raise ValueError(f"--reroute-steps must be >= 0, got {steps}")
        if not lr > 0:
            raise ValueError(f"--reroute-lr must be > 0, got {lr}")
        if interval < 1:
            raise ValueError(f"--reroute-interval must be >= 1, got {interval}")
        self.model, self.steps, self.lr, self.interval = model, steps, lr, interval
        self.routers = [getattr(layer, "router", None) for layer in model.routed_layers()]
        self.routers = [r for r in self.routers if r is not None and hasattr(r, "logit_offset")]
        if steps > 0 and not self.routers:
            raise ValueError("--decoding reroute: the model has no router with logits to offset")
        self.plain = PlainDecoder(model)
        self.offsets: list[Tensor] = []
        self.losses: list[float] = []

    def _adapt(self) -> Tensor:
        ids_BL = self.ids_BT[:, : self.length]
        if self.steps > 0:
            if not self.offsets:
                p = self.model.tok_emb.weight
                self.offsets = [
                    torch.zeros(r.weight.shape[0], device=p.device, dtype=torch.float32)
                    for r in self.routers
                ]
                for router, o in zip(self.routers, self.offsets, strict=True):
                    router.logit_offset = o
            for _ in range(self.steps):
                loss = reroute_step(self.model, self.offsets, ids_BL, self.pad_B, self.lr)
                self.losses.append(float(loss))
        return self.plain.prefill(ids_BL, self.pad_B, self.max_len)

    def prefill(self, ids_BL: Tensor, pad_B: Tensor | None, max_len: int) -> Tensor:
        self.pad_B, self.max_len, self.length = pad_B, max_len, ids_BL.shape[1]
        self.ids_BT = ids_BL.new_zeros((ids_BL.shape[0], max_len))
        self.ids_BT[:, : self.length] = ids_BL
        self.since = 0
        return self._adapt()

    def step(self, next_B: Tensor) -> Tensor:
        self.ids_BT[:, self.length] = next_B
        self.length += 1
        self.since += 1
        if self.steps > 0 and self.since % self.interval == 0:
            return self._adapt()
        return self.plain.step(next_B)

    def fork(self, max_len: int) -> RerouteDecoder:
        """A decoder going on from this one's state, room for ``max_len`` positions: the KV cache,
        the context and the adapted offsets copied (so the prompt is adapted once for all of its
        continuations). The copy's offsets go on the routers: the fork routes from now on, this
        decoder may be forked again but not stepped."""
        new = copy.copy(self)
        new.plain = self.plain.fork(max_len)
        new.offsets = [o.clone() for o in self.offsets]
        new.losses = list(self.losses)
        new.max_len = max_len
        new.ids_BT = self.ids_BT.new_zeros((self.ids_BT.shape[0], max_len))
        new.ids_BT[:, : self.length] = self.ids_BT[:, : self.length]
        if new.offsets:  # none before the first adaptation, or with steps=0
            for router, o in zip(self.routers, new.offsets, strict=True):
                router.logit_offset = o
        return new

    def remove(self) -> None:
        """Take the offsets off the routers (the model routes as trained again)."""
        for router in self.routers:
            router.logit_offset = None


def make_decoder(
    model: TransformerLM,
    decoding: str = "plain",
    *,
    scmoe_alpha: float = 0.1,
    scmoe_beta: float = 0.5,
    scmoe_weak_rank: int = 2,
    reroute_steps: int = 2,
    reroute_lr: float = 0.1,
    reroute_interval: int = 16,
) -> PlainDecoder | SCMoEDecoder | RerouteDecoder:
    """The decoder of ``decoding`` (one of :data:`DECODINGS`) with its options, checked before
    any work. Call its ``remove()`` afterwards to leave the model routing as trained."""
    if decoding == "plain":
        return PlainDecoder(model)
    if decoding == "scmoe":
        return SCMoEDecoder(model, scmoe_alpha, scmoe_beta, scmoe_weak_rank)
    if decoding == "reroute":
        return RerouteDecoder(model, reroute_steps, reroute_lr, reroute_interval)
    raise ValueError(f"--decoding must be one of {', '.join(DECODINGS)}, got {decoding!r}")
