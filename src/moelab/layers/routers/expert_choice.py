"""Expert Choice routing (Zhou et al. 2022, arXiv 2202.09368): each expert picks its top-C
tokens."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

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

INFERENCE_MODES = ("topk", "batch")


def expert_choice_capacity(capacity_factor: float, top_k: int, num_tokens: int, E: int) -> int:
    """Tokens each expert picks: ``C = ceil(capacity_factor · k · T / E)``, at most T. At factor 1
    the experts process ``k·T`` tokens in all, the compute of token-choice top-k."""
    return min(num_tokens, math.ceil(capacity_factor * top_k * num_tokens / E))


@register_router
class ExpertChoiceRouter(Router):
    """Expert Choice routing (Zhou, Lei, Liu, Du, Huang, Zhao, Dai, Chen, Le, Laudon 2022,
    arXiv 2202.09368, §3.2 eq. 1-2): ``S = softmax(X·W)`` over experts per token, then each expert
    picks the C tokens with the highest score in the batch (``G, I = TopK(Sᵀ, C)``) and weights
    them by those scores. ``C = ceil(ec_capacity_factor · k · T / E)`` over the T valid tokens of
    the forward: the paper's capacity factor c (average experts per token) is
    ``ec_capacity_factor · k`` here, so ``ec_capacity_factor=1`` matches top-k's compute.
    Balanced by construction: no aux loss; a token may get 0 experts (it keeps the residual path)
    or several.

    It is **not causal**: a token's experts depend on every token of the batch, later ones
    included. Training (``self.training``) always routes by expert choice over the micro-batch.
    In eval mode ``inference`` decides: ``"topk"`` (default, causal, used by generation) - each
    token takes its top ``round(ec_capacity_factor · k)`` experts of the same scores S, weighted by
    S; ``"batch"`` - expert choice over the evaluation batch as in training (non-causal: only for
    measuring the train/inference gap; a KV-cache decoding step (one position per sequence) is
    refused).

    The MoE block's own ``capacity_factor`` must stay None: this router sets the capacity itself
    (the option is ``ec_capacity_factor`` because ``capacity_factor`` is the block's argument).
    """

    name = "expert_choice"
    method = "expert_choice"
    sets_own_capacity = True  # MoE refuses its own capacity_factor on top of this one
    prunable = True  # not exactly: the scores are a softmax over all experts
    upcyclable = True
    convertible = True
    exportable = False
    not_exportable_reason = (
        "its paper defines no causal inference path (experts pick tokens over the whole batch; "
        "inference='topk' is moelab's own replacement, not the trained routing)"
    )

    def __init__(
        self,
        d_model: int,
        num_experts: int,
        top_k: int,
        *,
        ec_capacity_factor: float = 1.0,
        inference: str = "topk",
        z_loss_coef: float = 0.0,
        jitter_eps: float = 0.0,
        init_std: float = 0.02,
    ) -> None:
        if (
            not isinstance(ec_capacity_factor, int | float)
            or isinstance(ec_capacity_factor, bool)
            or not math.isfinite(ec_capacity_factor)
            or ec_capacity_factor <= 0
        ):
            raise ValueError(
                f"ec_capacity_factor must be a finite number > 0, got {ec_capacity_factor!r}"
            )
        if inference not in INFERENCE_MODES:
            raise ValueError(
                f"inference must be one of {', '.join(map(repr, INFERENCE_MODES))}, "
                f"got {inference!r}"
            )
        super().__init__(
            d_model,
            num_experts,
            top_k,
            init_std=init_std,
            z_loss_coef=z_loss_coef,
            jitter_eps=jitter_eps,
        )
        self.capacity_factor = float(ec_capacity_factor)
        self.inference = inference

    @classmethod
    def refusal(cls, capability: str, options: Mapping[str, Any] | None = None) -> str | None:
        """``inference="batch"`` withdraws causality: experts choose among the whole batch's
        tokens, later ones included."""
        batch = (options or {}).get("inference", "topk") == "batch"
        if batch and capability == "causal_at_inference":
            return (
                f"router {cls.name!r} with inference='batch' {CAPABILITIES[capability]}: each "
                "expert picks its tokens among the whole batch (use inference='topk')"
            )
        return super().refusal(capability, options)

    @property
    def inference_top_k(self) -> int:
        """Experts per token of the causal inference path: ``round(ec_capacity_factor · k)``."""
        return max(1, min(self.num_experts, round(self.capacity_factor * self.top_k)))

    def forward(
        self, x_TD: Tensor, valid_T: Tensor | None, context: RoutingContext | None = None
    ) -> RouterOutput:
        logits_TE = self.logits(x_TD)
        probs_TE = logits_TE.softmax(dim=-1)
        if self.training or self.inference == "batch":
            if not self.training:
                self._refuse_decoding(context)
            token_idx_N, expert_idx_N = self._expert_choice(probs_TE, valid_T)
        else:
            token_idx_N, expert_idx_N = self._token_choice(probs_TE, valid_T)
        weight_N = probs_TE[token_idx_N, expert_idx_N]
        decision = make_decision(
            token_idx_N, expert_idx_N, weight_N, x_TD.shape[0], self.num_experts
        )
        nonzero = torch.tensor(token_idx_N.numel(), device=x_TD.device)
        return RouterOutput(decision, logits_TE, probs_TE, nonzero)

    @staticmethod
    def _refuse_decoding(context: RoutingContext | None) -> None:
        """KV-cache decoding feeds one position per sequence: expert choice over those would route
        each sequence's next token against the other sequences' - refuse it loudly."""
        ids = None if context is None else context.token_ids
        if ids is not None and ids.dim() == 2 and ids.shape[1] == 1:
            raise ValueError(
                "router 'expert_choice' with inference='batch' cannot decode one position at a "
                "time (KV-cache generation): it is not causal; use inference='topk'"
            )

    def _expert_choice(self, probs_TE: Tensor, valid_T: Tensor | None) -> tuple[Tensor, Tensor]:
        """Each expert's top-C valid tokens; padding scores -inf so it is never picked."""
        num_tokens = probs_TE.shape[0]
        n_valid = num_tokens if valid_T is None else int(valid_T.sum())
        capacity = expert_choice_capacity(
            self.capacity_factor, self.top_k, n_valid, self.num_experts
        )
        scores_ET = probs_TE.detach().T
        if valid_T is not None:
            scores_ET = scores_ET.masked_fill(~valid_T[None, :], float("-inf"))
        token_idx_EC = scores_ET.topk(capacity, dim=-1).indices
        expert_idx_EC = torch.arange(self.num_experts, device=probs_TE.device)[:, None]
        return token_idx_EC.reshape(-1), expert_idx_EC.expand_as(token_idx_EC).reshape(-1)

    def _token_choice(self, probs_TE: Tensor, valid_T: Tensor | None) -> tuple[Tensor, Tensor]:
        """Causal inference: each valid token's top ``inference_top_k`` experts."""
        expert_idx_TK = probs_TE.detach().topk(self.inference_top_k, dim=-1).indices
        token_idx_TK = torch.arange(probs_TE.shape[0], device=probs_TE.device)[:, None]
        token_idx_TK = token_idx_TK.expand_as(expert_idx_TK)
        token_idx_N, expert_idx_N = token_idx_TK.reshape(-1), expert_idx_TK.reshape(-1)
        if valid_T is not None:
            keep_N = valid_T[token_idx_N]
            token_idx_N, expert_idx_N = token_idx_N[keep_N], expert_idx_N[keep_N]
        return token_idx_N, expert_idx_N
