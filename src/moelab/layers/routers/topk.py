"""Token-choice top-k routing with softmax: the baseline of the ReMoE paper and most MoE LMs."""

from __future__ import annotations

import torch
from torch import Tensor

from moelab.layers.base import RoutingContext
from moelab.layers.losses import global_load_balance_loss, sequence_load_balance_loss
from moelab.layers.ranks import SumsOverRanks
from moelab.layers.routers.balance import (
    SequencedRouterOutput,
    check_balance_scope,
    data_parallel_sum,
    selection_mask,
    sequence_length,
)
from moelab.layers.routers.base import (
    LossFn,
    Router,
    RouterOutput,
    check_coef,
    decision_from_choices,
    register_router,
    switch_balance_loss,
)


@register_router
class TopKRouter(Router, SumsOverRanks):
    """Token-choice top-k with softmax (Shazeer et al. 2017; Switch; Mixtral), with the Switch
    load-balancing loss (Fedus et al. 2021, eq. 4) weighted by ``balance_coef``.

    ``softmax_after_topk=False`` (default, as ReMoE's baseline): weights are the softmax over all E
    logits, taken at the top-k; ``renormalize=True`` rescales those k weights to sum to 1 (Mixtral).
    ``softmax_after_topk=True``: softmax over the k selected logits only.

    ``balance_scope`` says over which tokens the balance loss's expert frequencies ``f_e`` are
    counted: ``"batch"`` (default) the tokens of this forward (one micro-batch on one rank);
    ``"sequence"`` each sequence apart, the loss averaged over sequences (DeepSeek-V2 §2.2.3 /
    DeepSeek-V3 arXiv 2412.19437 eq. 17-20; the sequence length comes from
    ``context.token_ids``'s ``[B, L]`` shape); ``"global"`` this micro-batch's counts summed over
    all data-parallel ranks before the loss (Qiu et al. 2025, arXiv 2501.11873, eq. 3; ``P_e``
    stays local). ``jitter_eps`` is Switch's multiplicative input jitter (training only).
    """

    name = "topk"
    method = "topk"
    bench_shapes = True
    prunable = True
    upcyclable = True
    convertible = True
    routes_by_rank = True
    mergeable = True  # merged experts share weight slots; routing stays over all E

    def __init__(
        self,
        d_model: int,
        num_experts: int,
        top_k: int,
        *,
        renormalize: bool = False,
        softmax_after_topk: bool = False,
        balance_coef: float = 0.01,
        balance_scope: str = "batch",
        z_loss_coef: float = 0.0,
        jitter_eps: float = 0.0,
        init_std: float = 0.02,
    ) -> None:
        if softmax_after_topk and top_k == 1:
            raise ValueError(
                "softmax_after_topk needs top_k > 1: a softmax over one selected logit is "
                "always 1, so the router would get no gradient"
            )
        super().__init__(
            d_model,
            num_experts,
            top_k,
            init_std=init_std,
            z_loss_coef=z_loss_coef,
            jitter_eps=jitter_eps,
        )
        self.balance_coef = check_coef("balance_coef", balance_coef)
        check_balance_scope(balance_scope)
        self.balance_scope = balance_scope
        self.renormalize = renormalize
        self.softmax_after_topk = softmax_after_topk

    def forward(
        self, x_TD: Tensor, valid_T: Tensor | None, context: RoutingContext | None = None
    ) -> RouterOutput:
        logits_TE = self.logits(x_TD)
        probs_TE = logits_TE.softmax(dim=-1)
        rank = None if self.training else self.inference_rank
        top_logits_TK, top_idx_TK = logits_TE.topk(rank or self.top_k, dim=-1)
        if rank is not None:  # routes_by_rank: the rank-th expert alone (SCMoE's weak routing)
            top_logits_TK, top_idx_TK = top_logits_TK[:, -1:], top_idx_TK[:, -1:]
        if self.softmax_after_topk:
            weight_TK = top_logits_TK.softmax(dim=-1)
        else:
            weight_TK = probs_TE.gather(1, top_idx_TK)
            if self.renormalize:
                weight_TK = weight_TK / weight_TK.sum(-1, keepdim=True)
        num_tokens = x_TD.shape[0]
        decision, nonzero = decision_from_choices(top_idx_TK, weight_TK, valid_T, self.num_experts)
        if self.balance_scope == "sequence":
            seq_len = sequence_length(context, num_tokens, "balance_scope='sequence'")
            return SequencedRouterOutput(decision, logits_TE, probs_TE, nonzero, seq_len=seq_len)
        return RouterOutput(decision, logits_TE, probs_TE, nonzero)

    def prunes_exactly(self) -> bool:
        """Renormalised (or softmaxed over the k chosen) gates depend on the chosen experts'
        logits alone, and experts no token chose never enter a top-k."""
        return self.renormalize or self.softmax_after_topk

    def fixed_losses(self) -> dict[str, tuple[float, LossFn]]:
        return {"load_balance": (self.balance_coef, self._balance_loss)} | super().fixed_losses()

    def _balance_loss(self, out: RouterOutput, valid_T: Tensor | None) -> Tensor:
        """The Switch loss with ``f_e`` counted over ``balance_scope``'s tokens."""
        decision = out.decision
        if self.balance_scope == "sequence":
            assert isinstance(out, SequencedRouterOutput) and out.seq_len is not None
            selected_TE = selection_mask(
                decision.token_idx_N, decision.expert_idx_N, decision.num_tokens, self.num_experts
            )
            return sequence_load_balance_loss(
                out.scores_TE, selected_TE, valid_T, self.top_k, out.seq_len
            )
        if self.balance_scope == "global":
            n_valid = torch.tensor(
                decision.num_tokens if valid_T is None else int(valid_T.sum()),
                device=out.scores_TE.device,
            )
            counts_E, n_global = data_parallel_sum(
                self.rank_sum, decision.tokens_per_expert_E, n_valid
            )
            return global_load_balance_loss(out.scores_TE, counts_E, n_global, valid_T, self.top_k)
        return switch_balance_loss(out, valid_T, self.top_k)
