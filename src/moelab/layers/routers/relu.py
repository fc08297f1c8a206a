"""ReMoE's ReLU router (arXiv 2412.14711)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from moelab.layers.base import RoutingContext
from moelab.layers.losses import remoe_l1_loss
from moelab.layers.routers.base import Router, RouterOutput, make_decision, register_router


@register_router
class ReLURouter(Router):
    """ReMoE's router (arXiv 2412.14711, eq. 5): ``R(x) = ReLU(x W)``; no softmax, no top-k.

    Every positive output is an assignment whose weight is that output, so each token gets a
    variable number of experts (possibly none: it then keeps only the residual path). Its L1
    penalty (eq. 7, load-balanced unless ``l1_balanced=False``) is the controlled loss: its
    coefficient λ is adapted each step towards ``sparsity_target = 1 − k/E`` (eq. 8) by
    :class:`~moelab.layers.SparsityController`.
    """

    name = "relu"
    method = "remoe"
    controlled_loss = "remoe_l1"
    bench_shapes = True
    prunable = True
    upcyclable = True
    convertible = True
    mergeable = True  # merged experts share weight slots; routing stays over all E

    def __init__(
        self,
        d_model: int,
        num_experts: int,
        top_k: int,
        *,
        l1_balanced: bool = True,
        z_loss_coef: float = 0.0,
        init_std: float = 0.02,
    ) -> None:
        if top_k >= num_experts:
            raise ValueError(
                f"top_k must be < num_experts for router 'relu' (target sparsity 1 - k/E > 0), "
                f"got top_k={top_k}, num_experts={num_experts}"
            )
        super().__init__(d_model, num_experts, top_k, init_std=init_std, z_loss_coef=z_loss_coef)
        self.l1_balanced = l1_balanced

    def forward(
        self, x_TD: Tensor, valid_T: Tensor | None, context: RoutingContext | None = None
    ) -> RouterOutput:
        logits_TE = self.logits(x_TD)
        relu_TE = F.relu(logits_TE)
        active_TE = relu_TE > 0
        if valid_T is not None:
            active_TE = active_TE & valid_T[:, None]
        token_idx_N, expert_idx_N = active_TE.nonzero(as_tuple=True)
        weight_N = relu_TE[token_idx_N, expert_idx_N]
        decision = make_decision(
            token_idx_N, expert_idx_N, weight_N, x_TD.shape[0], self.num_experts
        )
        nonzero = torch.tensor(token_idx_N.numel(), device=x_TD.device)
        return RouterOutput(decision, logits_TE, relu_TE, nonzero)

    def aux_losses(self, out: RouterOutput, valid_T: Tensor | None) -> dict[str, Tensor]:
        l1 = remoe_l1_loss(out.scores_TE, valid_T, self.top_k, self.l1_balanced)
        return {self.controlled_loss: l1} | super().aux_losses(out, valid_T)

    def prunes_exactly(self) -> bool:
        """Each expert's gate ``ReLU(x·w_e)`` is independent of the other experts."""
        return True

    @property
    def sparsity_target(self) -> float:
        return 1.0 - self.top_k / self.num_experts
