"""Top-p ("dynamic") routing: each token takes experts until their probability mass reaches p."""

from __future__ import annotations

import torch
from torch import Tensor

from moelab.layers.base import RoutingContext
from moelab.layers.routers.balance import flat_assignments
from moelab.layers.routers.base import (
    LossFn,
    Router,
    RouterOutput,
    check_coef,
    make_decision,
    register_router,
    switch_balance_loss,
)


def top_p_mask(probs_TE: Tensor, p: float, max_experts: int | None) -> Tensor:
    """bool ``[T, E]``: per token, the fewest most-probable experts whose probabilities sum to at
    least ``p`` (Huang et al. 2024, §3), at most ``max_experts`` of them.

    The rule is a count: token t keeps its ``n_t`` most probable experts, with ``n_t = 1 +`` the
    number of ranks ``j >= 1`` whose mass before them, ``P_(1) + ... + P_(j)``, is still below
    ``p``. So the top-1 expert is always kept and the expert that crosses ``p`` is included.

    Why it is exact: the masses before each rank are summed in float64 over the (float32 or
    float64) probabilities, in rank order, and compared with ``p`` as a float64 number (never
    rounded to the probabilities' dtype): a float32 cumulative sum rounds to 1.0 before the last
    experts, and ``p`` rounded to float32 moves the boundary by up to 3e-8. Summing E float32
    numbers in float64 is off by at most ``E·2⁻⁵³`` relative, so a decision can differ from exact
    arithmetic only when ``p`` lies that close to a partial sum. ``p = 1`` keeps every expert by
    definition (the probabilities of a softmax sum to 1 only up to rounding, so no sum may
    decide it), subject to ``max_experts``.
    Experts of equal probability are ranked by index (a stable sort), lower first.
    """
    num_experts = probs_TE.shape[-1]
    cap = num_experts if max_experts is None else min(max_experts, num_experts)
    sorted_TE, order_TE = probs_TE.sort(dim=-1, descending=True, stable=True)
    if p >= 1:
        count_T = torch.full(probs_TE.shape[:-1], cap, device=probs_TE.device)
    else:  # mass of ranks 0..j-1 for each rank j >= 1, in float64; p stays a float64 number
        mass_before_TE = sorted_TE[:, :-1].to(torch.float64).cumsum(-1)
        count_T = (1 + (mass_before_TE < p).sum(-1)).clamp(max=cap)
    rank_E = torch.arange(num_experts, device=probs_TE.device)
    keep_sorted_TE = rank_E < count_T[:, None]
    return torch.zeros_like(keep_sorted_TE).scatter(1, order_TE, keep_sorted_TE)


def router_entropy(probs_TE: Tensor, valid_T: Tensor | None) -> Tensor:
    """Huang et al.'s dynamic loss: the token mean of ``−Σ_e P_e log P_e``, minimised
    so that the router grows confident and top-p selects few experts where it can."""
    entropy_T = -(probs_TE * probs_TE.clamp_min(1e-30).log()).sum(-1)
    if valid_T is None:
        return entropy_T.mean()
    return (entropy_T * valid_T).sum() / valid_T.sum().clamp_min(1)


def _token_balance_loss(out: RouterOutput, valid_T: Tensor | None) -> Tensor:
    """Switch's loss with ``f_e`` the fraction of tokens (k = 1), whatever each token's count."""
    return switch_balance_loss(out, valid_T, 1)


def _dynamic_loss(out: RouterOutput, valid_T: Tensor | None) -> Tensor:
    return router_entropy(out.scores_TE, valid_T)


@register_router
class TopPRouter(Router):
    """Top-p dynamic routing (Huang, An, Zhuang et al. 2024, "Harder Tasks Need More Experts:
    Dynamic Routing in MoE Models", arXiv 2403.07652, ACL 2024, §3: the top-p selection, the
    dynamic loss and the total loss; equation numbers not re-checked against the paper).

    ``P = softmax(x W)`` over the E experts; experts sorted by ``P`` are added until their
    cumulative probability is ``>= p``, so a confident token uses one expert and an uncertain one
    several (``last_stats.active_mean`` reports the mean). Each selected expert's weight is its
    probability ``P_e`` (not renormalised, as the paper). Losses: the dynamic loss (router entropy)
    weighted by ``dynamic_loss_coef`` (the paper's β = 1e-4), and the Switch balance loss
    weighted by ``balance_coef`` (the paper's α = 1e-2) with ``f_e`` the fraction of *tokens* that
    chose expert ``e``, so that at perfect balance it equals the mean experts per token,
    not 1. ``top_k`` plays no part in the selection (the MoE block uses it for capacity).

    Options: ``p`` in (0, 1] (paper: 0.4), ``max_experts`` (None: up to E), ``dynamic_loss_coef``,
    ``balance_coef``, ``z_loss_coef``, ``jitter_eps``.
    """

    name = "top_p"
    method = "top_p"
    prunable = True  # not exactly: the probability mass counted towards p is over all experts
    upcyclable = True
    convertible = True

    def __init__(
        self,
        d_model: int,
        num_experts: int,
        top_k: int,
        *,
        p: float = 0.4,
        max_experts: int | None = None,
        dynamic_loss_coef: float = 1e-4,
        balance_coef: float = 0.01,
        z_loss_coef: float = 0.0,
        jitter_eps: float = 0.0,
        init_std: float = 0.02,
    ) -> None:
        if isinstance(p, bool) or not isinstance(p, int | float) or not 0 < p <= 1:
            raise ValueError(f"p must be in (0, 1], got {p!r}")
        if max_experts is not None and (
            isinstance(max_experts, bool)
            or not isinstance(max_experts, int)
            or not 1 <= max_experts <= num_experts
        ):
            raise ValueError(
                f"max_experts must be None or an integer in [1, {num_experts}], got {max_experts!r}"
            )
        super().__init__(
            d_model,
            num_experts,
            top_k,
            init_std=init_std,
            z_loss_coef=z_loss_coef,
            jitter_eps=jitter_eps,
        )
        self.p = float(p)
        self.max_experts = max_experts
        self.dynamic_loss_coef = check_coef("dynamic_loss_coef", dynamic_loss_coef)
        self.balance_coef = check_coef("balance_coef", balance_coef)

    def forward(
        self, x_TD: Tensor, valid_T: Tensor | None, context: RoutingContext | None = None
    ) -> RouterOutput:
        logits_TE = self.logits(x_TD)
        probs_TE = logits_TE.softmax(dim=-1)
        with torch.no_grad():
            select_TE = top_p_mask(probs_TE, self.p, self.max_experts)
        token_idx_N, expert_idx_N, weight_N = flat_assignments(select_TE, probs_TE, valid_T)
        decision = make_decision(
            token_idx_N, expert_idx_N, weight_N, x_TD.shape[0], self.num_experts
        )
        nonzero = torch.tensor(token_idx_N.numel(), device=x_TD.device)
        return RouterOutput(decision, logits_TE, probs_TE, nonzero)

    def fixed_losses(self) -> dict[str, tuple[float, LossFn]]:
        own = {
            "load_balance": (self.balance_coef, _token_balance_loss),
            "dynamic": (self.dynamic_loss_coef, _dynamic_loss),
        }
        return own | super().fixed_losses()
