"""Routers: map tokens to a :class:`RoutingDecision` (flat token/expert/weight assignments).

A router is a small module ``router(x_TD, valid_T) -> RouterOutput``. Its logits are computed in
float32 whatever the input dtype (PITFALLS: router numerics). Adding a router from the literature
means one class here and one entry in :data:`ROUTERS`; every dispatcher and expert backend works
with it unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moelab.layers.base import RoutingDecision


@dataclass(frozen=True)
class RouterOutput:
    """A decision plus the dense router tensors the layer's losses and statistics need."""

    decision: RoutingDecision
    logits_TE: Tensor  # float32 pre-activation router outputs
    scores_TE: Tensor  # softmax probabilities (TopK) or ReLU outputs (ReMoE), float32
    nonzero: Tensor  # selected / positive (token, expert) pairs over valid tokens, before dropping


def make_decision(
    token_idx_N: Tensor, expert_idx_N: Tensor, weight_N: Tensor, num_tokens: int, num_experts: int
) -> RoutingDecision:
    """A decision from flat assignments, with its per-expert histogram."""
    counts_E = torch.bincount(expert_idx_N, minlength=num_experts)
    return RoutingDecision(
        token_idx_N=token_idx_N,
        expert_idx_N=expert_idx_N,
        weight_N=weight_N,
        tokens_per_expert_E=counts_E,
        num_tokens=num_tokens,
        num_experts=num_experts,
    )


class LinearRouter(nn.Module):
    """Shared part of the routers: a bias-free ``[E, D]`` gate (``nn.Linear(D, E)`` layout, the one
    ``transformers`` uses for Mixtral's ``gate``), applied in float32."""

    def __init__(self, d_model: int, num_experts: int, init_std: float) -> None:
        super().__init__()
        self.num_experts = num_experts
        self.weight = nn.Parameter(torch.empty(num_experts, d_model))
        nn.init.normal_(self.weight, std=init_std)

    def logits(self, x_TD: Tensor) -> Tensor:
        """Router logits in at least float32 (float64 stays float64, for reference tests)."""
        dtype = torch.promote_types(x_TD.dtype, torch.float32)
        with torch.autocast(device_type=x_TD.device.type, enabled=False):
            return F.linear(x_TD.to(dtype), self.weight.to(dtype))


class TopKRouter(LinearRouter):
    """Token-choice top-k with softmax (Shazeer et al. 2017; Switch; Mixtral).

    ``softmax_after_topk=False`` (default, as ReMoE's baseline): weights are the softmax over all E
    logits, taken at the top-k; ``renormalize=True`` rescales those k weights to sum to 1 (Mixtral).
    ``softmax_after_topk=True``: softmax over the k selected logits only.
    """

    def __init__(
        self,
        d_model: int,
        num_experts: int,
        top_k: int,
        *,
        renormalize: bool = False,
        softmax_after_topk: bool = False,
        init_std: float = 0.02,
    ) -> None:
        super().__init__(d_model, num_experts, init_std)
        self.top_k = top_k
        self.renormalize = renormalize
        self.softmax_after_topk = softmax_after_topk

    def forward(self, x_TD: Tensor, valid_T: Tensor | None) -> RouterOutput:
        logits_TE = self.logits(x_TD)
        probs_TE = logits_TE.softmax(dim=-1)
        top_logits_TK, top_idx_TK = logits_TE.topk(self.top_k, dim=-1)
        if self.softmax_after_topk:
            weight_TK = top_logits_TK.softmax(dim=-1)
        else:
            weight_TK = probs_TE.gather(1, top_idx_TK)
            if self.renormalize:
                weight_TK = weight_TK / weight_TK.sum(-1, keepdim=True)
        num_tokens = x_TD.shape[0]
        token_idx_TK = torch.arange(num_tokens, device=x_TD.device)[:, None].expand_as(top_idx_TK)
        token_idx_N, expert_idx_N, weight_N = (
            token_idx_TK.reshape(-1),
            top_idx_TK.reshape(-1),
            weight_TK.reshape(-1),
        )
        if valid_T is not None:
            keep_N = valid_T[token_idx_N]
            token_idx_N, expert_idx_N, weight_N = (
                token_idx_N[keep_N],
                expert_idx_N[keep_N],
                weight_N[keep_N],
            )
        decision = make_decision(token_idx_N, expert_idx_N, weight_N, num_tokens, self.num_experts)
        nonzero = torch.tensor(token_idx_N.numel(), device=x_TD.device)
        return RouterOutput(decision, logits_TE, probs_TE, nonzero)


class ReLURouter(LinearRouter):
    """ReMoE's router (arXiv 2412.14711, eq. 5): ``R(x) = ReLU(x W)``; no softmax, no top-k.

    Every positive output is an assignment whose weight is that output, so each token gets a
    variable number of experts (possibly none: it then keeps only the residual path).
    """

    def forward(self, x_TD: Tensor, valid_T: Tensor | None) -> RouterOutput:
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


ROUTERS = {"topk": TopKRouter, "relu": ReLURouter}


def uniform_assignment(
    num_tokens: int, num_experts: int, top_k: int, valid_T: Tensor | None, device: torch.device
) -> tuple[Tensor, Tensor]:
    """Debug routing: token t goes to experts ``(t·k + j) mod E`` - perfectly balanced, so speed can
    be measured apart from routing quality. Returns ``(token_idx_N, expert_idx_N)``."""
    token_idx_N = torch.arange(num_tokens, device=device).repeat_interleave(top_k)
    expert_idx_N = torch.arange(num_tokens * top_k, device=device) % num_experts
    if valid_T is not None:
        keep_N = valid_T[token_idx_N]
        token_idx_N, expert_idx_N = token_idx_N[keep_N], expert_idx_N[keep_N]
    return token_idx_N, expert_idx_N
