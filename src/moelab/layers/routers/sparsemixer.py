"""SparseMixer-v2 (GRIN): top-2 routing by sampling, with a gradient estimator for the choice."""

from __future__ import annotations

import torch
from torch import Tensor

from moelab.layers.base import RoutingContext
from moelab.layers.routers.base import (
    LossFn,
    Router,
    RouterOutput,
    check_coef,
    decision_from_choices,
    register_router,
    switch_balance_loss,
)

# Heun's third-order rule f(x) − f(0) ≈ ¼·f'(x) + ¾·f'(x/3): with probability ¾ a non-greedy
# choice is evaluated at the point x/3 (its weight scaled by 1/3).
HEUN_MIDPOINT_PROB = 0.75


def far_from_top(scores_TE: Tensor, mask_eps: float) -> Tensor:
    """bool ``[T, E]``: experts whose score is too far below the token's best to be chosen,
    ``(max − s_e) / max(|s_e|, max) > 2·mask_eps`` (GRIN §2, the sparsity mask); experts
    already excluded (``−inf``) stay excluded."""
    top_T1 = scores_TE.max(dim=-1, keepdim=True).values
    finite_TE = torch.isfinite(scores_TE)
    safe_TE = torch.where(finite_TE, scores_TE, top_T1)
    scale_TE = torch.maximum(safe_TE.abs(), top_T1)
    return ~finite_TE | ((top_T1 - safe_TE) / scale_TE > 2 * mask_eps)


class SparseMixerGate(torch.autograd.Function):
    """The gate of one chosen expert ``D``: forward ``π_D · c`` (``c`` the Heun scale), backward
    ``∂L/∂z_j = g · π_D · (1{j = D} − π_j)`` — the gradient of ``π_D`` (the masked softmax at the
    choice) with the choice held fixed, *not* scaled by ``c``: the scale only enters the forward
    value, so that the expected forward difference matches the third-order estimate."""

    @staticmethod
    def forward(ctx, logits_TE: Tensor, probs_TE: Tensor, choice_T1: Tensor, scale_T1: Tensor):
        chosen_T1 = probs_TE.gather(1, choice_T1)
        ctx.save_for_backward(probs_TE, choice_T1, chosen_T1)
        return chosen_T1 * scale_T1

    @staticmethod
    def backward(ctx, grad_T1: Tensor):
        probs_TE, choice_T1, chosen_T1 = ctx.saved_tensors
        g_T1 = grad_T1 * chosen_T1
        grad_TE = -probs_TE * g_T1
        grad_TE = grad_TE.scatter_add(1, choice_T1, g_T1)
        return grad_TE, None, None, None


def pick_one(scores_TE: Tensor, mask_eps: float, training: bool) -> tuple[Tensor, Tensor, Tensor]:
    """One expert per token from ``scores_TE`` (``−inf`` = unavailable): the masked softmax
    ``π``, the choice ``D`` (sampled from ``π`` by Gumbel-max when training, else its argmax) and
    the Heun scale ``c`` (1 for the greedy choice; else 1/3 with probability ¾, 1 otherwise).
    Nothing here carries gradient."""
    with torch.no_grad():
        masked_TE = scores_TE.masked_fill(far_from_top(scores_TE, mask_eps), float("-inf"))
        probs_TE = masked_TE.softmax(dim=-1)
        greedy_T1 = masked_TE.argmax(dim=-1, keepdim=True)
        scale_T1 = torch.ones_like(greedy_T1, dtype=probs_TE.dtype)
        if not training:
            return probs_TE, greedy_T1, scale_T1
        gumbel_TE = -torch.empty_like(masked_TE).exponential_().log()
        choice_T1 = (masked_TE + gumbel_TE).argmax(dim=-1, keepdim=True)
        midpoint_T1 = torch.rand_like(scale_T1) < HEUN_MIDPOINT_PROB
        scale_T1 = torch.where((choice_T1 != greedy_T1) & midpoint_T1, 1.0 / 3.0, scale_T1)
        return probs_TE, choice_T1, scale_T1


@register_router
class SparseMixerRouter(Router):
    """SparseMixer-v2 routing (Liu et al. 2024, "GRIN: GRadient-INformed MoE", arXiv 2409.12136,
    §2; built on SparseMixer, Liu et al. 2023, arXiv 2310.00811).

    Per token and per slot (top-1, then top-2 among the rest): experts whose logit is too far
    below the best (:func:`far_from_top`, ``mask_eps``) are masked; the expert ``D`` is *sampled*
    from the masked softmax ``π`` when training (the argmax at evaluation); its gate is ``π_D``,
    times the Heun scale ``c`` during training. The router gradient is the custom estimator of
    :class:`SparseMixerGate` (``∂π_D/∂z`` with the choice fixed, not scaled by ``c``) where plain
    TopK differentiates the full softmax at a deterministic choice; the second slot repeats this
    with the first expert's logit set to ``−inf``. With the Switch balance loss (``balance_coef``,
    over the unmasked softmax, as TopK's). The mask, sampling, Heun constants (¾, 1/3) and the
    backward agree with the ``sparsemixer`` routine of ``transformers``' PhiMoE model (GRIN's
    architecture), checked for this implementation - see docs/moe.md.

    Options: ``mask_eps`` (GRIN's 0.01), ``balance_coef``, ``z_loss_coef``, ``jitter_eps``.
    ``top_k`` must be 1 or 2 (GRIN is top-2; top-1 is its first slot alone).
    """

    name = "sparsemixer"
    method = "sparsemixer"
    prunable = True  # not exactly: the mask and π are over all experts
    upcyclable = True
    convertible = True
    example_top_k = 2  # GRIN is top-2

    def __init__(
        self,
        d_model: int,
        num_experts: int,
        top_k: int,
        *,
        mask_eps: float = 0.01,
        balance_coef: float = 0.01,
        z_loss_coef: float = 0.0,
        jitter_eps: float = 0.0,
        init_std: float = 0.02,
    ) -> None:
        if top_k not in (1, 2):
            raise ValueError(f"top_k must be 1 or 2 for router 'sparsemixer', got {top_k}")
        super().__init__(
            d_model,
            num_experts,
            top_k,
            init_std=init_std,
            z_loss_coef=z_loss_coef,
            jitter_eps=jitter_eps,
        )
        self.mask_eps = check_coef("mask_eps", mask_eps)
        self.balance_coef = check_coef("balance_coef", balance_coef)

    def forward(
        self, x_TD: Tensor, valid_T: Tensor | None, context: RoutingContext | None = None
    ) -> RouterOutput:
        logits_TE = self.logits(x_TD)
        remaining_TE = logits_TE.detach()
        choices, weights = [], []
        for _ in range(self.top_k):
            probs_TE, choice_T1, scale_T1 = pick_one(remaining_TE, self.mask_eps, self.training)
            weights.append(SparseMixerGate.apply(logits_TE, probs_TE, choice_T1, scale_T1))
            choices.append(choice_T1)
            remaining_TE = remaining_TE.scatter(1, choice_T1, float("-inf"))
        expert_idx_TK, weight_TK = torch.cat(choices, 1), torch.cat(weights, 1)
        decision, nonzero = decision_from_choices(
            expert_idx_TK, weight_TK, valid_T, self.num_experts
        )
        return RouterOutput(decision, logits_TE, logits_TE.softmax(dim=-1), nonzero)

    def fixed_losses(self) -> dict[str, tuple[float, LossFn]]:
        return {"load_balance": (self.balance_coef, self._balance_loss)} | super().fixed_losses()

    def _balance_loss(self, out: RouterOutput, valid_T: Tensor | None) -> Tensor:
        return switch_balance_loss(out, valid_T, self.top_k)
