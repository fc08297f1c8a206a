"""The MoE block: router → permutation → grouped experts → weighted combine (+ shared experts).

The block only wires the pieces (router, dispatcher, experts and combine are separate units, each
swappable and tested alone; ``moe.dispatcher`` decides where the experts run) and records what the
rest of moelab reads: aux losses, routing statistics, and an observer hook.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from moelab.layers import dispatch
from moelab.layers.base import RoutedLayer, RoutingDecision, RoutingStats
from moelab.layers.dense import DenseFFN, check_activation, check_positive_int
from moelab.layers.experts import GroupedExperts, check_backend
from moelab.layers.routers import RouterOutput, build_router, make_decision, uniform_assignment


def check_moe_args(
    d_model: int,
    d_hidden: int,
    num_experts: int,
    top_k: int,
    granularity: int = 1,
    shared_experts: int = 0,
    capacity_factor: float | None = None,
    activation: str = "swiglu",
    backend: str = "auto",
    shared_gate: bool = False,
) -> None:
    """The MoE block's own argument checks (the router checks its options when built); shared
    with the config, which runs them at load time without allocating a layer."""
    for name, value in (
        ("d_model", d_model),
        ("d_hidden", d_hidden),
        ("num_experts", num_experts),
        ("top_k", top_k),
        ("granularity", granularity),
    ):
        check_positive_int(name, value)
    if top_k > num_experts:
        raise ValueError(f"top_k must be <= num_experts ({num_experts}), got {top_k}")
    if d_hidden % granularity:
        raise ValueError(f"granularity must divide d_hidden ({d_hidden}), got {granularity}")
    if not isinstance(shared_experts, int) or shared_experts < 0:
        raise ValueError(f"shared_experts must be an integer >= 0, got {shared_experts!r}")
    if shared_gate and not shared_experts:
        raise ValueError("shared_gate needs shared_experts >= 1 (it gates the shared experts)")
    if capacity_factor is not None and (
        not isinstance(capacity_factor, int | float)
        or not math.isfinite(capacity_factor)
        or capacity_factor <= 0
    ):
        raise ValueError(
            "capacity_factor must be None (dropless) or a finite number > 0, "
            f"got {capacity_factor!r}"
        )
    check_activation(activation)
    check_backend(backend)


class MoE(RoutedLayer):
    """A sparse Mixture-of-Experts FFN, a drop-in for :class:`~moelab.layers.DenseFFN`.

    Args:
        d_model: D.
        d_hidden: hidden width of one coarse expert (the dense FFN it replaces).
        num_experts: coarse experts E (before granularity).
        top_k: coarse experts per token k. For ``router="relu"`` it only sets the sparsity target
            ``1 − k/E`` that :class:`~moelab.layers.SparsityController` drives towards.
        router: a registered router (:data:`moelab.layers.routers.ROUTERS`): ``"topk"`` (softmax
            + top-k, Switch balance loss) or ``"relu"`` (ReMoE), ...
        granularity: G. The layer holds ``E·G`` experts of width ``d_hidden/G`` and routes
            ``k·G`` of them per token (fine-grained experts, DeepSeekMoE / ReMoE §4); active compute
            is unchanged and the ReLU target stays ``1 − k/E``.
        shared_experts: S always-on experts of width ``d_hidden/G`` (DeepSeekMoE shared experts),
            computed for every token in addition to the routed ones.
        shared_gate: scale the shared experts' output per token by ``sigmoid(x · w)``, a learnt
            ``[1, D]`` gate (Qwen2-MoE's ``shared_expert_gate``); needs ``shared_experts > 0``.
        capacity_factor: ``None`` is dropless (no token is ever dropped); a number caps each expert
            at ``ceil(capacity_factor · T · k·G / (E·G))`` assignments, dropping later tokens first.
        activation: expert activation (``"swiglu"`` default).
        backend: expert compute backend, see :mod:`moelab.layers.experts`.
        init_std: normal init std of router and experts.
        debug_uniform_routing: route token t to experts ``(t·k + j) mod E`` (speed measurements
            independent of routing quality; gates are uniform ``1/k``).
        **router_options: the router's own options, e.g. ``balance_coef``, ``z_loss_coef``,
            ``renormalize``, ``softmax_after_topk`` (TopK), ``l1_balanced`` (ReLU); see
            :func:`moelab.layers.routers.router_options`.
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
        activation: str = "swiglu",
        backend: str = "auto",
        init_std: float = 0.02,
        debug_uniform_routing: bool = False,
        shared_gate: bool = False,
        **router_options: Any,
    ) -> None:
        super().__init__()
        check_moe_args(
            d_model,
            d_hidden,
            num_experts,
            top_k,
            granularity,
            shared_experts,
            capacity_factor,
            activation,
            backend,
            shared_gate,
        )
        if not init_std > 0:
            raise ValueError(f"init_std must be > 0, got {init_std!r}")

        self.d_model = d_model
        self.granularity = granularity
        self.num_experts = num_experts * granularity  # routed (fine-grained) experts
        self.top_k = top_k * granularity  # routed experts per token
        self.expert_hidden = d_hidden // granularity
        self.capacity_factor = capacity_factor
        self.debug_uniform_routing = debug_uniform_routing
        self.router = build_router(
            router, d_model, self.num_experts, self.top_k, init_std, **router_options
        )
        self.router_name = router
        self.controlled_loss = self.router.controlled_loss
        self.aux_coefficients = self.router.aux_coefficients()
        self.experts = GroupedExperts(
            self.num_experts, d_model, self.expert_hidden, activation, init_std, backend
        )
        self.shared = (
            DenseFFN(d_model, shared_experts * self.expert_hidden, activation, init_std)
            if shared_experts
            else None
        )
        self.shared_gate = None
        if shared_gate:  # nn.Linear(D, 1) layout, as Qwen2-MoE's shared_expert_gate
            self.shared_gate = torch.nn.Linear(d_model, 1, bias=False)
            torch.nn.init.normal_(self.shared_gate.weight, std=init_std)
        # Where the experts run: here (default), or an expert-parallel dispatcher installed from
        # outside (moelab.distributed.apply_expert_parallel); not a module, so not in state_dict.
        self.dispatcher: dispatch.Dispatcher = dispatch.LocalDispatcher()

    @property
    def sparsity_target(self) -> float | None:
        return self.router.sparsity_target

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
                self.capacity_factor, n_valid, self.top_k, self.num_experts
            )
            decision = dispatch.apply_capacity(decision, capacity)

        y_TD = self.dispatcher.run(x_TD, decision, self.experts)  # permute → experts → combine
        if self.shared is not None:
            shared_TD = self.shared(x_TD)
            if self.shared_gate is not None:
                shared_TD = torch.sigmoid(self.shared_gate(x_TD)) * shared_TD
            y_TD = y_TD + shared_TD

        if self.should_record():
            self._record(routed, decision, valid_T, assigned)
        if self.routing_observer is not None:
            self.routing_observer(self, decision, x_TD)
        return y_TD.reshape(shape)

    def _uniform_decision(self, x_TD: Tensor, valid_T: Tensor | None) -> RoutingDecision:
        k = self.top_k
        token_idx_N, expert_idx_N = uniform_assignment(
            x_TD.shape[0], self.num_experts, k, valid_T, x_TD.device
        )
        weight_N = torch.full(token_idx_N.shape, 1.0 / k, device=x_TD.device)
        return make_decision(token_idx_N, expert_idx_N, weight_N, x_TD.shape[0], self.num_experts)

    def _record(
        self, routed: RouterOutput, decision: RoutingDecision, valid_T: Tensor | None, assigned: int
    ) -> None:
        """Aux losses (with graph) and detached statistics of this training forward."""
        self.aux_losses = self.router.aux_losses(routed, valid_T)

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
