"""AdaMoE's null experts: zero-output experts that join the top-k, so tokens use fewer real ones."""

from __future__ import annotations

import torch
from torch import Tensor

from moelab.layers.base import RoutingContext
from moelab.layers.losses import switch_load_balance_loss
from moelab.layers.routers.base import (
    LossFn,
    Router,
    RouterOutput,
    check_coef,
    decision_from_choices,
    register_router,
)


def null_expert_balance_loss(
    logits_all_TE: Tensor, probs_all_TE: Tensor, valid_T: Tensor | None, top_k: int
) -> Tensor:
    """The Switch loss over all ``E + n`` experts, null ones included (their loads are recounted
    from the top-k of ``logits_all_TE``: the decision holds real assignments only)."""
    top_idx_TK = logits_all_TE.detach().topk(top_k, dim=-1).indices
    if valid_T is not None:
        top_idx_TK = top_idx_TK[valid_T]
    counts_all_E = torch.bincount(top_idx_TK.reshape(-1), minlength=logits_all_TE.shape[-1])
    return switch_load_balance_loss(probs_all_TE, counts_all_E, valid_T, top_k)


@register_router
class NullExpertRouter(Router):
    """Top-k over ``E`` real and ``null_experts`` null experts (AdaMoE: Zeng, Miao, Wang et al.
    2024, "AdaMoE: Token-Adaptive Routing with Mixture-of-Experts Language Models", arXiv
    2406.13233, §3; equation numbers not re-checked against the paper).

    The gate has ``E + n`` rows; ``P = softmax(x W)`` over all of them and the top-k are chosen
    among all of them. A null expert outputs zero, so a token that picks j null experts costs
    ``k − j`` real experts: null picks are not in the decision (``last_stats.active_mean`` is the
    real experts per token, below k; ``tokens_per_expert`` has the E real experts). The weights
    are the selected probabilities (``renormalize=True``: divided by the sum over the k selected,
    null ones included, as Mixtral's top-k softmax that AdaMoE builds on). The Switch balance loss
    runs over all ``E + n`` experts (each null expert is balanced like a real one), so the router
    cannot route everything to nulls for free.

    Options: ``null_experts`` (n >= 0; 0 is plain TopK), ``renormalize``, ``balance_coef``,
    ``z_loss_coef``, ``jitter_eps``.
    """

    name = "null"
    method = "adamoe"
    prunable = True  # the null experts' rows are all kept
    upcyclable = True
    convertible = True
    example_top_k = 2  # with k = 1, a null pick leaves a token no expert at all

    def __init__(
        self,
        d_model: int,
        num_experts: int,
        top_k: int,
        *,
        null_experts: int = 4,
        renormalize: bool = False,
        balance_coef: float = 0.01,
        z_loss_coef: float = 0.0,
        jitter_eps: float = 0.0,
        init_std: float = 0.02,
    ) -> None:
        if isinstance(null_experts, bool) or not isinstance(null_experts, int) or null_experts < 0:
            raise ValueError(f"null_experts must be an integer >= 0, got {null_experts!r}")
        if renormalize and top_k == 1:
            raise ValueError(
                "renormalize needs top_k > 1: one renormalised weight is always 1, so the router "
                "would get no gradient"
            )
        super().__init__(
            d_model,
            num_experts + null_experts,
            top_k,
            init_std=init_std,
            z_loss_coef=z_loss_coef,
            jitter_eps=jitter_eps,
        )
        self.balance_coef = check_coef("balance_coef", balance_coef)
        self.num_experts = num_experts  # real experts; the gate has num_experts + null rows
        self.null_experts = null_experts
        self.renormalize = renormalize

    def forward(
        self, x_TD: Tensor, valid_T: Tensor | None, context: RoutingContext | None = None
    ) -> RouterOutput:
        logits_TE = self.logits(x_TD)  # [T, E + n]: real experts first
        probs_TE = logits_TE.softmax(dim=-1)
        top_idx_TK = logits_TE.topk(self.top_k, dim=-1).indices
        weight_TK = probs_TE.gather(1, top_idx_TK)
        if self.renormalize:
            weight_TK = weight_TK / weight_TK.sum(-1, keepdim=True)
        real_TK = top_idx_TK < self.num_experts  # null picks cost nothing: not in the decision
        decision, nonzero = decision_from_choices(
            top_idx_TK, weight_TK, valid_T, self.num_experts, keep_TK=real_TK
        )
        return RouterOutput(decision, logits_TE, probs_TE, nonzero)

    def gate_rows(self, experts_K: Tensor) -> Tensor:
        """The real experts' rows, then every null expert's."""
        nulls = torch.arange(self.num_experts, self.num_experts + self.null_experts)
        return torch.cat([experts_K, nulls.to(experts_K.device)])

    def prunes_exactly(self) -> bool:
        """Renormalised over the k chosen (null ones included), the gates depend on the chosen
        logits alone."""
        return self.renormalize

    def fixed_losses(self) -> dict[str, tuple[float, LossFn]]:
        return {"load_balance": (self.balance_coef, self._balance_loss)} | super().fixed_losses()

    def _balance_loss(self, out: RouterOutput, valid_T: Tensor | None) -> Tensor:
        return null_expert_balance_loss(out.logits_TE, out.scores_TE, valid_T, self.top_k)
