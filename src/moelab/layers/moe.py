"""The MoE block: router → permutation → grouped experts → weighted combine (+ shared experts).

The block only wires the pieces (DESIGN: router, dispatcher, experts, combine are separate units)
and records what the rest of moelab reads: aux losses, routing statistics, and an observer hook.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from moelab.layers import dispatch
from moelab.layers.base import RoutedLayer, RoutingDecision, RoutingStats
from moelab.layers.dense import DenseFFN, check_activation, check_positive_int
from moelab.layers.experts import GroupedExperts, check_backend
from moelab.layers.losses import remoe_l1_loss, router_z_loss, switch_load_balance_loss
from moelab.layers.routers import (
    ROUTERS,
    ReLURouter,
    TopKRouter,
    make_decision,
    uniform_assignment,
)


def _check_coef(name: str, value: float) -> None:
    if not isinstance(value, int | float) or not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")


class MoE(RoutedLayer):
    """A sparse Mixture-of-Experts FFN, a drop-in for :class:`~moelab.layers.DenseFFN`.

    Args:
        d_model: D.
        d_hidden: hidden width of one coarse expert (the dense FFN it replaces).
        num_experts: coarse experts E (before granularity).
        top_k: coarse experts per token k. For ``router="relu"`` it only sets the sparsity target
            ``1 − k/E`` that :class:`~moelab.layers.SparsityController` drives towards.
        router: ``"topk"`` (softmax + top-k, Switch balance loss) or ``"relu"`` (ReMoE).
        granularity: G. The layer holds ``E·G`` experts of width ``d_hidden/G`` and routes
            ``k·G`` of them per token (fine-grained experts, DeepSeekMoE / ReMoE §4); active compute
            is unchanged and the ReLU target stays ``1 − k/E``.
        shared_experts: S always-on experts of width ``d_hidden/G`` (DeepSeekMoE shared experts),
            computed for every token in addition to the routed ones.
        capacity_factor: ``None`` is dropless (no token is ever dropped); a number caps each expert
            at ``ceil(capacity_factor · T · k·G / (E·G))`` assignments, dropping later tokens first.
        renormalize: TopK only: rescale the k gate weights to sum to 1 (Mixtral).
        softmax_after_topk: TopK only: softmax over the selected logits instead of all E.
        balance_coef: Switch load-balancing loss coefficient (TopK; 0 disables).
        z_loss_coef: router z-loss coefficient (0, the default, disables).
        l1_balanced: ReLU only: use ReMoE's load-balanced L1 (default) or plain L1.
        activation: expert activation (``"swiglu"`` default).
        backend: expert compute backend, see :mod:`moelab.layers.experts`.
        init_std: normal init std of router and experts.
        debug_uniform_routing: route token t to experts ``(t·k + j) mod E`` (speed measurements
            independent of routing quality; gates are uniform ``1/k``).
    """

    def __init__(
        self,
        d_model: int,
        d_hidden: int,
        num_experts: int,
        top_k: int,
        *,
        router: str = "topk",
        granularity: int = 1,
        shared_experts: int = 0,
        capacity_factor: float | None = None,
        renormalize: bool = False,
        softmax_after_topk: bool = False,
        balance_coef: float = 0.01,
        z_loss_coef: float = 0.0,
        l1_balanced: bool = True,
        activation: str = "swiglu",
        backend: str = "auto",
        init_std: float = 0.02,
        debug_uniform_routing: bool = False,
    ) -> None:
        super().__init__()
        for name, value in (
            ("d_model", d_model),
            ("d_hidden", d_hidden),
            ("num_experts", num_experts),
            ("top_k", top_k),
            ("granularity", granularity),
        ):
            check_positive_int(name, value)
        if router not in ROUTERS:
            raise ValueError(f"router must be one of {tuple(ROUTERS)}, got {router!r}")
        if top_k > num_experts:
            raise ValueError(f"top_k must be <= num_experts ({num_experts}), got {top_k}")
        if router == "relu" and top_k == num_experts:
            raise ValueError(
                f"router='relu' needs top_k < num_experts (target sparsity 1 - k/E > 0), got "
                f"top_k={top_k}, num_experts={num_experts}"
            )
        if d_hidden % granularity:
            raise ValueError(
                f"d_hidden ({d_hidden}) must be divisible by granularity, "
                f"got granularity={granularity}"
            )
        if not isinstance(shared_experts, int) or shared_experts < 0:
            raise ValueError(f"shared_experts must be an integer >= 0, got {shared_experts!r}")
        if capacity_factor is not None and (
            not isinstance(capacity_factor, int | float)
            or not math.isfinite(capacity_factor)
            or capacity_factor <= 0
        ):
            raise ValueError(
                "capacity_factor must be None (dropless) or a finite number > 0, "
                f"got {capacity_factor!r}"
            )
        _check_coef("balance_coef", balance_coef)
        _check_coef("z_loss_coef", z_loss_coef)
        check_activation(activation)
        check_backend(backend)
        if not init_std > 0:
            raise ValueError(f"init_std must be > 0, got {init_std!r}")

        self.d_model = d_model
        self.router_name = router
        self.granularity = granularity
        self.num_experts = num_experts * granularity  # routed (fine-grained) experts
        self.top_k = top_k * granularity  # routed experts per token (TopK)
        self.expert_hidden = d_hidden // granularity
        self.capacity_factor = capacity_factor
        self.balance_coef, self.z_loss_coef = float(balance_coef), float(z_loss_coef)
        self.l1_balanced = l1_balanced
        self.debug_uniform_routing = debug_uniform_routing
        # ReMoE's target sparsity 1 - k/E (unchanged by granularity); None for TopK.
        self.sparsity_target: float | None = 1.0 - top_k / num_experts if router == "relu" else None

        if router == "topk":
            self.router = TopKRouter(
                d_model,
                self.num_experts,
                self.top_k,
                renormalize=renormalize,
                softmax_after_topk=softmax_after_topk,
                init_std=init_std,
            )
        else:
            self.router = ReLURouter(d_model, self.num_experts, init_std)
        self.experts = GroupedExperts(
            self.num_experts, d_model, self.expert_hidden, activation, init_std, backend
        )
        self.shared = (
            DenseFFN(d_model, shared_experts * self.expert_hidden, activation, init_std)
            if shared_experts
            else None
        )
        if router == "topk" and balance_coef > 0:
            self.aux_coefficients["load_balance"] = self.balance_coef
        if z_loss_coef > 0:
            self.aux_coefficients["z_loss"] = self.z_loss_coef

    def forward(self, x: Tensor, token_mask: Tensor | None = None) -> Tensor:
        shape = x.shape
        x_TD = x.reshape(-1, self.d_model)
        valid_T = None if token_mask is None else token_mask.reshape(-1).to(torch.bool)
        if valid_T is not None and valid_T.shape[0] != x_TD.shape[0]:
            raise ValueError(
                f"token_mask must have the leading shape of x {tuple(shape[:-1])}, "
                f"got {tuple(token_mask.shape)}"
            )

        routed = self.router(x_TD, valid_T)
        decision = routed.decision
        if self.debug_uniform_routing:
            decision = self._uniform_decision(x_TD, valid_T)
        assigned = decision.num_assignments
        if self.capacity_factor is not None:
            n_valid = x_TD.shape[0] if valid_T is None else int(valid_T.sum())
            capacity = dispatch.expert_capacity(
                self.capacity_factor, n_valid, self.top_k_for_capacity, self.num_experts
            )
            decision = dispatch.apply_capacity(decision, capacity)

        perm = dispatch.permute(decision, pad_limit=self.experts.pad_limit(x_TD))
        y_ND = self.experts(dispatch.gather(x_TD, perm), perm.counts, perm.weight_N)
        y_TD = dispatch.combine(y_ND, perm, weighted=True)
        if self.shared is not None:
            y_TD = y_TD + self.shared(x_TD)

        if self.should_record():
            self._record(routed, decision, valid_T, assigned)
        if self.routing_observer is not None:
            self.routing_observer(self, decision, x_TD)
        return y_TD.reshape(shape)

    @property
    def top_k_for_capacity(self) -> float:
        """Expected assignments per token: k·G for TopK, the target's k·G for ReLU."""
        if self.sparsity_target is None:
            return float(self.top_k)
        return (1.0 - self.sparsity_target) * self.num_experts

    def _uniform_decision(self, x_TD: Tensor, valid_T: Tensor | None) -> RoutingDecision:
        k = max(1, round(self.top_k_for_capacity))
        token_idx_N, expert_idx_N = uniform_assignment(
            x_TD.shape[0], self.num_experts, k, valid_T, x_TD.device
        )
        weight_N = torch.full(token_idx_N.shape, 1.0 / k, device=x_TD.device)
        return make_decision(token_idx_N, expert_idx_N, weight_N, x_TD.shape[0], self.num_experts)

    def _record(
        self, routed, decision: RoutingDecision, valid_T: Tensor | None, assigned: int
    ) -> None:
        """Aux losses (with graph) and detached statistics of this training forward."""
        losses: dict[str, Tensor] = {}
        if self.router_name == "topk" and self.balance_coef > 0:
            losses["load_balance"] = switch_load_balance_loss(
                routed.scores_TE, routed.decision.tokens_per_expert_E, valid_T, self.top_k
            )
        if self.router_name == "relu":
            k = round(self.top_k_for_capacity)
            losses["remoe_l1"] = remoe_l1_loss(routed.scores_TE, valid_T, k, self.l1_balanced)
        if self.z_loss_coef > 0:
            losses["z_loss"] = router_z_loss(routed.logits_TE, valid_T)
        self.aux_losses = losses

        with torch.no_grad():
            num_tokens = decision.num_tokens
            n_valid = torch.tensor(num_tokens) if valid_T is None else valid_T.sum()
            per_token_T = torch.bincount(decision.token_idx_N, minlength=num_tokens)
            per_valid = per_token_T[valid_T] if valid_T is not None else per_token_T
            empty = per_valid.numel() == 0
            zero = torch.zeros((), dtype=torch.long)
            self.last_stats = RoutingStats(
                num_tokens=n_valid.detach().cpu(),
                num_experts=self.num_experts,
                tokens_per_expert=decision.tokens_per_expert_E.detach().cpu(),
                router_nonzero=routed.nonzero.detach().cpu(),
                router_total=(n_valid * self.num_experts).detach().cpu(),
                active_min=zero if empty else per_valid.min().cpu(),
                active_max=zero if empty else per_valid.max().cpu(),
                active_sum=per_valid.sum().cpu(),
                dropped=torch.as_tensor(decision.dropped).detach().cpu(),
                assigned=torch.tensor(assigned),
            )

    def extra_repr(self) -> str:
        return (
            f"router={self.router_name}, experts={self.num_experts}, top_k={self.top_k}, "
            f"granularity={self.granularity}, capacity_factor={self.capacity_factor}"
        )
