"""Lory's causal segment routing: one softmax over experts per segment of a sequence, decided by
the previous segment (the weights that :mod:`moelab.layers.lory` merges the experts with)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor

from moelab.layers.base import RoutingContext
from moelab.layers.routers.base import (
    CAPABILITIES,
    Router,
    RouterOutput,
    make_decision,
    register_router,
)

FIRST_SEGMENT = ("uniform", "self")
PAPER_SEGMENT_LEN = 256  # Zhong et al.'s segment length (for 4096-token sequences)


def default_segment_len(seq_len: int) -> int:
    """The segment length a model config derives when none is set: a quarter of the sequence
    length (four segments, so the router learns from three of them), at most the paper's 256
    (16 segments at the paper's 4096 tokens). 128-token sequences get 32."""
    return max(1, min(PAPER_SEGMENT_LEN, seq_len // 4))


@dataclass(frozen=True)
class SegmentRouting:
    """Per sequence and segment: the weights the experts are merged with, and their logits.

    ``weights_BSE[b, s]`` is the softmax of ``logits_BSE[b, s]``; segment ``s`` merges with it.
    For ``s >= 1`` both come from segment ``s − 1``'s mean hidden state.
    """

    logits_BSE: Tensor  # float32 (or wider)
    weights_BSE: Tensor
    segment_len: int


@register_router
class LoryRouter(Router):
    """Lory's causal segment routing (Zhong, Xia, Chen & Lewis 2024, *Lory: Fully Differentiable
    Mixture-of-Experts for Autoregressive Language Model Pre-training*, arXiv 2405.03133, §3.1-3.2,
    the segment-routing and expert-merging equations).

    A sequence is cut into segments ``s_1, s_2, ...`` of ``segment_len`` tokens. Segment ``i`` is
    routed by the previous one: ``h̄_{i−1} = mean of s_{i−1}'s hidden states`` (valid tokens only),
    ``w_i = softmax(W_r h̄_{i−1})`` over the E experts. The MoE block then runs every token of
    ``s_i`` through ONE FFN whose weights are ``Σ_e w_{i,e} θ_e`` (soft merging in parameter space,
    :func:`moelab.layers.lory.merged_experts_ffn`). No token is dropped and everything is
    differentiable: the router gets its gradient through the merged weights, so there is no
    load-balancing loss (the paper has none).

    Since a segment's weights come from earlier tokens only, the layer is causal from the second
    segment on. The first segment has no predecessor (``first_segment``):

    * ``"uniform"`` (default): ``w_1 = 1/E`` (the experts' mean). Strictly causal: no token's
      output depends on a later token. The router gets no gradient from ``s_1``.
    * ``"self"``: the paper's choice: ``s_1``'s own mean routes it, with the gradient stopped.
      A token of ``s_1`` then sees (through E merge weights) the later tokens of ``s_1``.

    The router learns only from the second segment on, so a training sequence must hold at
    least two segments: ``segment_len`` must be below its length. A training forward with a
    longer ``segment_len`` is refused (one line); a model config derives ``segment_len`` from
    ``max_seq_len`` when it is not set and checks a set one (:meth:`fit_options`).

    Args:
        segment_len: T, tokens per segment (default the paper's 256; a model config without one
            uses :func:`default_segment_len` of ``max_seq_len``, 32 for 128-token models).
        first_segment: ``"uniform"`` or ``"self"``, see above.

    ``forward`` on flat tokens is refused: segments are cut along the sequence, so the MoE block
    calls :meth:`route` with ``x`` as ``[B, L, D]``. ``top_k`` is unused (every expert is merged).
    """

    name = "lory"
    method = "lory"
    upcyclable = True
    convertible = True
    lacks = {
        "prunable": "every token uses every expert (merged per segment), so usage cannot rank "
        "the experts to keep",
        "mergeable": "every token uses every expert (merged per segment); nothing is "
        "dispatched to shared weight slots",
    }
    # TransformerLM refuses KV-cache decoding with this message: one new token has no segment
    # position and no previous segment mean (the layer keeps no decoding state).
    kv_cache_error: ClassVar[str] = (
        "router 'lory' cannot decode with a KV cache (a decoded token's segment weights depend on "
        "the previous segment's hidden states, which the layer does not keep); run full forwards "
        "over the whole sequence instead"
    )

    exportable = False
    not_exportable_reason = (
        "moelab does not implement its paper's inference path (one merge per layer from the "
        "prompt) and keeps no decoding state for a KV cache"
    )

    def __init__(
        self,
        d_model: int,
        num_experts: int,
        top_k: int,
        *,
        segment_len: int = PAPER_SEGMENT_LEN,
        first_segment: str = "uniform",
        init_std: float = 0.02,
    ) -> None:
        if not isinstance(segment_len, int) or isinstance(segment_len, bool) or segment_len < 1:
            raise ValueError(f"segment_len must be a positive integer, got {segment_len!r}")
        if first_segment not in FIRST_SEGMENT:
            raise ValueError(f"first_segment must be one of {FIRST_SEGMENT}, got {first_segment!r}")
        super().__init__(d_model, num_experts, top_k, init_std=init_std)
        self.segment_len = segment_len
        self.first_segment = first_segment

    @classmethod
    def fit_options(cls, options: dict[str, Any], seq_len: int, where: str) -> dict[str, Any]:
        """``options`` for sequences of ``seq_len`` tokens (``where`` names that length in
        messages, e.g. ``"max_seq_len"``): ``segment_len`` derived when absent
        (:func:`default_segment_len`), refused when a sequence would hold one segment only.
        Raises ``ValueError("segment_len ...")``, which the config reports on the option."""
        if "segment_len" not in options:
            options = options | {"segment_len": default_segment_len(seq_len)}
        segment_len = options["segment_len"]
        if seq_len < 2:
            raise ValueError(
                f"segment_len has no valid value for {where}={seq_len}: router 'lory' needs "
                "sequences of at least 2 tokens (segment i is routed by segment i-1)"
            )
        is_int = isinstance(segment_len, int) and not isinstance(segment_len, bool)
        if is_int and not 1 <= segment_len < seq_len:  # other types: the router's own check
            raise ValueError(
                f"segment_len must be an integer in [1, {seq_len - 1}] (below {where}="
                f"{seq_len}: with one segment per sequence the router never learns, as "
                f"segment i is routed by segment i-1), got {segment_len}"
            )
        return options

    @classmethod
    def refusal(cls, capability: str, options: Mapping[str, Any] | None = None) -> str | None:
        """``first_segment="self"`` withdraws causality: the first segment is routed by its own
        mean, later tokens included."""
        own = (options or {}).get("first_segment", "uniform") == "self"
        if own and capability == "causal_at_inference":
            return (
                f"router {cls.name!r} with first_segment='self' {CAPABILITIES[capability]}: the "
                "first segment is routed by its own mean (use first_segment='uniform')"
            )
        return super().refusal(capability, options)

    @classmethod
    def example_options(cls, seq_len: int) -> dict[str, Any]:
        """Two segments per sequence, so that the second is routed by the first."""
        return {"segment_len": max(1, seq_len // 2)}

    def forward(
        self, x_TD: Tensor, valid_T: Tensor | None, context: RoutingContext | None = None
    ) -> RouterOutput:
        raise ValueError(
            "router 'lory' routes segments of sequences, not flat tokens: use it through MoE "
            "with x shaped [batch, seq_len, d_model] (LoryRouter.route)"
        )

    def route(self, x_BLD: Tensor, valid_BL: Tensor | None) -> SegmentRouting:
        """The merge weights of every segment of every sequence in ``x_BLD``."""
        if x_BLD.dim() != 3:
            raise ValueError(
                "router 'lory' needs x shaped [batch, seq_len, d_model] (segments are cut along "
                f"the sequence), got shape {tuple(x_BLD.shape)}"
            )
        if self.training and torch.is_grad_enabled() and x_BLD.shape[1] <= self.segment_len:
            raise ValueError(
                f"segment_len ({self.segment_len}) must be below the sequence length "
                f"({x_BLD.shape[1]}) of a training forward: with one segment per sequence the "
                "router gets no gradient (segment i is routed by segment i-1); use segment_len "
                f"in [1, {x_BLD.shape[1] - 1}]"
            )
        mean_BSD = segment_means(x_BLD, valid_BL, self.segment_len)
        own_BSE = self.logits(mean_BSD)  # logits of each segment's own mean
        first_B1E = own_BSE[:, :1].detach()  # "self": s_1's own, gradient stopped
        if self.first_segment == "uniform":
            first_B1E = torch.zeros_like(first_B1E)
        logits_BSE = torch.cat([first_B1E, own_BSE[:, :-1]], dim=1)  # s_i routed by s_{i−1}
        return SegmentRouting(logits_BSE, logits_BSE.softmax(dim=-1), self.segment_len)

    def router_output(
        self, routing: SegmentRouting, valid_T: Tensor | None, seq_len: int
    ) -> RouterOutput:
        """The routing as flat per-token assignments (every valid token to every expert, with its
        segment's weight): what the MoE block records and shows the routing observer."""
        logits_TE = per_token(routing.logits_BSE, routing.segment_len, seq_len)
        weights_TE = per_token(routing.weights_BSE, routing.segment_len, seq_len)
        num_tokens, num_experts = weights_TE.shape
        token_idx_TE = torch.arange(num_tokens, device=weights_TE.device)[:, None]
        token_idx_TE = token_idx_TE.expand(num_tokens, num_experts)
        expert_idx_TE = torch.arange(num_experts, device=weights_TE.device).expand_as(token_idx_TE)
        keep_TE = weights_TE > 0
        if valid_T is not None:
            keep_TE = keep_TE & valid_T[:, None]
        token_idx_N, expert_idx_N = token_idx_TE[keep_TE], expert_idx_TE[keep_TE]
        decision = make_decision(
            token_idx_N, expert_idx_N, weights_TE[keep_TE], num_tokens, num_experts
        )
        nonzero = torch.tensor(token_idx_N.numel(), device=weights_TE.device)
        return RouterOutput(decision, logits_TE, weights_TE, nonzero)


def segment_means(x_BLD: Tensor, valid_BL: Tensor | None, segment_len: int) -> Tensor:
    """Mean hidden state of each segment over its valid tokens, ``[B, S, D]`` with ``S =
    ceil(L / segment_len)`` (the last segment may be shorter; a segment with no valid token has
    mean 0). Computed in float32 (or wider), as the router's logits."""
    B, L, D = x_BLD.shape
    S = math.ceil(L / segment_len)
    dtype = torch.promote_types(x_BLD.dtype, torch.float32)
    valid = (
        torch.ones(B, L, dtype=dtype, device=x_BLD.device)
        if valid_BL is None
        else valid_BL.to(dtype)
    )
    pad = S * segment_len - L
    x_BSTD = torch.nn.functional.pad(x_BLD.to(dtype) * valid[..., None], (0, 0, 0, pad))
    x_BSTD = x_BSTD.view(B, S, segment_len, D)
    count_BS = torch.nn.functional.pad(valid, (0, pad)).view(B, S, segment_len).sum(-1)
    return x_BSTD.sum(2) / count_BS.clamp(min=1)[..., None]


def per_token(values_BSX: Tensor, segment_len: int, seq_len: int) -> Tensor:
    """Each token's row of its segment's values, flattened to ``[B·L, X]``."""
    B, S, X = values_BSX.shape
    expanded = values_BSX[:, :, None].expand(B, S, segment_len, X).reshape(B, S * segment_len, X)
    return expanded[:, :seq_len].reshape(B * seq_len, X)
