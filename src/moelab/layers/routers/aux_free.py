"""DeepSeek-V3's auxiliary-loss-free balancing: a per-expert selection bias moved between steps."""

from __future__ import annotations

import torch
from torch import Tensor

from moelab.layers.base import RoutingContext
from moelab.layers.losses import sequence_load_balance_loss
from moelab.layers.routers.balance import (
    SequencedRouterOutput,
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
)

SCORES = ("sigmoid", "softmax")


@register_router
class AuxFreeRouter(Router):
    """Auxiliary-loss-free load balancing (DeepSeek-AI 2024, "DeepSeek-V3 Technical Report",
    arXiv 2412.19437, §2.1.2: affinities eq. 15, gates eq. 12-13 and 16, bias update in the text
    after eq. 16, complementary sequence-wise loss eq. 17-20; Wang et al. 2024, arXiv 2408.15664).

    Affinities ``s = sigmoid(x W)`` (``score="softmax"``: ``softmax(x W)``). Each token picks the
    top-k of ``s + b``, where ``b`` is a per-expert bias used for *selection only*; the gate is the
    unbiased ``s`` of the selected experts, divided by their sum (``normalize=True``, eq. 13) or
    not. ``b`` is a buffer (checkpointed) moved once per optimizer step by
    :class:`~moelab.layers.RouterLoadHook`: ``b_e ← b_e + γ · sign(mean load − load_e)`` with
    ``γ = bias_update_rate`` and the step's loads (all micro-batches and ranks). The optional
    sequence-wise balance loss (eq. 17-20, ``seq_balance_coef``; V3 uses 1e-4) needs the
    sequence structure from ``context.token_ids``.

    Options: ``bias_update_rate`` (0.001), ``score`` ("sigmoid" | "softmax"), ``normalize``,
    ``seq_balance_coef`` (0: off), ``z_loss_coef``, ``jitter_eps``.
    """

    name = "aux_free"
    method = "aux_free"
    updates_between_steps = True
    prunable = True
    upcyclable = True
    convertible = True
    example_top_k = 2  # normalize (the default) needs k > 1

    def __init__(
        self,
        d_model: int,
        num_experts: int,
        top_k: int,
        *,
        bias_update_rate: float = 0.001,
        score: str = "sigmoid",
        normalize: bool = True,
        seq_balance_coef: float = 0.0,
        z_loss_coef: float = 0.0,
        jitter_eps: float = 0.0,
        init_std: float = 0.02,
    ) -> None:
        if score not in SCORES:
            raise ValueError(f"score must be one of 'sigmoid', 'softmax', got {score!r}")
        if normalize and top_k == 1:
            raise ValueError(
                "normalize needs top_k > 1: one normalised gate is always 1, so the router "
                "would get no gradient (set normalize=false for top-1)"
            )
        super().__init__(
            d_model,
            num_experts,
            top_k,
            init_std=init_std,
            z_loss_coef=z_loss_coef,
            jitter_eps=jitter_eps,
        )
        self.bias_update_rate = check_coef("bias_update_rate", bias_update_rate)
        self.score = score
        self.normalize = normalize
        self.seq_balance_coef = check_coef("seq_balance_coef", seq_balance_coef)
        self.register_buffer("bias_E", torch.zeros(num_experts, dtype=torch.float32))

    def affinities(self, logits_TE: Tensor) -> Tensor:
        return logits_TE.sigmoid() if self.score == "sigmoid" else logits_TE.softmax(-1)

    def forward(
        self, x_TD: Tensor, valid_T: Tensor | None, context: RoutingContext | None = None
    ) -> RouterOutput:
        logits_TE = self.logits(x_TD)
        scores_TE = self.affinities(logits_TE)
        biased_TE = scores_TE.detach() + self.bias_E.to(scores_TE.dtype)
        top_idx_TK = biased_TE.topk(self.top_k, dim=-1).indices
        gate_TK = scores_TE.gather(1, top_idx_TK)
        if self.normalize:
            gate_TK = gate_TK / gate_TK.sum(-1, keepdim=True)
        num_tokens = x_TD.shape[0]
        decision, nonzero = decision_from_choices(top_idx_TK, gate_TK, valid_T, self.num_experts)
        seq_len = None
        if self.seq_balance_coef > 0:
            seq_len = sequence_length(context, num_tokens, "seq_balance_coef > 0")
        return SequencedRouterOutput(decision, logits_TE, scores_TE, nonzero, seq_len=seq_len)

    def step_update(self, tokens_per_expert_E: Tensor) -> None:
        """``b_e ← b_e + γ · sign(mean load − load_e)``: overloaded experts become less likely to
        be selected next step, underloaded ones more."""
        load_E = tokens_per_expert_E.to(torch.float64)
        delta_E = self.bias_update_rate * torch.sign(load_E.mean() - load_E)
        self.bias_E += delta_E.to(self.bias_E.dtype)

    def pruned_state(self, kept_K: Tensor) -> dict[str, Tensor]:
        """The gate's rows and the selection bias of the kept experts."""
        state = super().pruned_state(kept_K)
        state["bias_E"] = state["bias_E"].index_select(0, kept_K.to(state["bias_E"].device))
        return state

    def prunes_exactly(self) -> bool:
        """Sigmoid affinities are per expert; a softmax's are not."""
        return self.score == "sigmoid"

    def fixed_losses(self) -> dict[str, tuple[float, LossFn]]:
        own = {"seq_balance": (self.seq_balance_coef, self._seq_balance_loss)}
        return own | super().fixed_losses()

    def _seq_balance_loss(self, out: RouterOutput, valid_T: Tensor | None) -> Tensor:
        assert isinstance(out, SequencedRouterOutput) and out.seq_len is not None
        decision = out.decision
        selected_TE = selection_mask(
            decision.token_idx_N, decision.expert_idx_N, decision.num_tokens, self.num_experts
        )
        normalized_TE = out.scores_TE / out.scores_TE.sum(-1, keepdim=True)  # eq. 19
        return sequence_load_balance_loss(
            normalized_TE, selected_TE, valid_T, self.top_k, out.seq_len
        )
