"""The MoE block: router → permutation → grouped experts → weighted combine (+ shared experts).

The block only wires the pieces (router, dispatcher, experts and combine are separate units, each
swappable and tested alone; ``moe.dispatcher`` decides where the experts run) and records what the
rest of moelab reads: aux losses, routing statistics, and an observer hook.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from moelab.layers import dispatch
from moelab.layers.base import RoutedLayer, RoutingContext, RoutingDecision, RoutingStats
from moelab.layers.dense import DenseFFN
from moelab.layers.expert_banks import build_expert_bank
from moelab.layers.lory import merged_experts_ffn
from moelab.layers.moe_checks import check_expert_slots, check_moe_args, check_router_fits
from moelab.layers.routers import (
    RouterOutput,
    build_router,
    make_decision,
    uniform_assignment,
)
from moelab.layers.routers.lory import LoryRouter

MOMENTUM_KEY = "momentum_smoe"  # MomentumSMoE's p_l, passed from one MoE layer to the next


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
            It applies in training mode only (``self.training``).
        eval_capacity_factor: the same cap in eval mode (evaluation, generation, analysis).
            ``None`` (default): dropless at inference whatever ``capacity_factor`` is, so a
            token's output depends neither on the other sequences of its batch nor on how many
            positions a forward carries (KV-cache decoding equals a full forward). Set it (e.g.
            to ``capacity_factor``) to evaluate with the training behaviour.
        activation: expert activation (``"swiglu"`` default).
        backend: expert compute backend, see :mod:`moelab.layers.experts`.
        init_std: normal init std of router and experts.
        debug_uniform_routing: route token t to experts ``(t·k + j) mod E`` (speed measurements
            independent of routing quality; gates are uniform ``1/k``).
        momentum: μ of MomentumSMoE (Teo & Nguyen 2024, arXiv 2410.14574, §3): the layer
            returns ``γ·p_l`` with ``p_l = f_l(x_l) + μ·p_{l−1}`` (``f_l`` the plain MoE output,
            ``p_{l−1}`` passed on by the previous MoE layer through the
            :class:`~moelab.layers.base.RoutingContext`, ``p_0 = 0``). 0 (default): off.
        momentum_step: γ, the step size of that update (1.0 default; μ=0, γ=1 is the plain MoE).
        iterations: C of Chain-of-Experts (Wang et al. 2025, arXiv 2506.18945, eq. 4): the experts
            run C times in sequence, ``x⁽ᵗ⁾ = MoE_t(x⁽ᵗ⁻¹⁾) + x⁽ᵗ⁻¹⁾`` with a router of its own
            per iteration (shared experts run in every iteration); the layer returns
            ``x⁽ᶜ⁾ − x⁽⁰⁾`` (the block's residual adds the input). 1 (default): the plain MoE.
        expert_slots, expert_quant, expert_quant_group, expert_quant_keep, compressed_experts,
            compressed_width: the expert bank ``moelab compress`` wrote (merged weight slots,
            quantized experts, compressed stand-ins): :mod:`moelab.layers.expert_banks`.
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
        momentum: float = 0.0,
        momentum_step: float = 1.0,
        iterations: int = 1,
        eval_capacity_factor: float | None = None,
        expert_slots: int | None = None,
        expert_quant: str = "none",
        expert_quant_group: int = 32,
        expert_quant_keep: int = 0,
        compressed_experts: int = 0,
        compressed_width: int = 0,
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
            momentum,
            momentum_step,
            iterations,
            eval_capacity_factor,
        )
        if not init_std > 0:
            raise ValueError(f"init_std must be > 0, got {init_std!r}")

        self.d_model = d_model
        self.granularity = granularity
        self.num_experts = num_experts * granularity  # routed (fine-grained) experts
        self.top_k = top_k * granularity  # routed experts per token
        self.expert_hidden = d_hidden // granularity
        self.capacity_factor = capacity_factor
        self.eval_capacity_factor = eval_capacity_factor
        self.debug_uniform_routing = debug_uniform_routing
        self.router = build_router(
            router, d_model, self.num_experts, self.top_k, init_std, **router_options
        )
        check_router_fits(
            router, capacity_factor, iterations, debug_uniform_routing, eval_capacity_factor
        )
        self.router_name = router
        check_expert_slots(expert_slots, self.num_experts, router, router_options)
        self.expert_slots = expert_slots
        # contiguous groups until a merge's state is loaded; None: one slot per expert
        slot_E = None
        if expert_slots is not None:
            slot_E = torch.arange(self.num_experts) * expert_slots // self.num_experts
        self.expert_slot: Tensor | None
        self.register_buffer("expert_slot", slot_E)
        # Lory merges the experts per segment instead of dispatching tokens (_merged_pass).
        self.merges_experts = isinstance(self.router, LoryRouter)
        # Chain-of-Experts: iteration t > 0 has a router of its own ("independent gating")
        self.chain_routers = torch.nn.ModuleList(
            build_router(router, d_model, self.num_experts, self.top_k, init_std, **router_options)
            for _ in range(iterations - 1)
        )
        self.iterations = iterations
        self.momentum, self.momentum_step = float(momentum), float(momentum_step)
        self.controlled_loss = self.router.controlled_loss
        self.aux_coefficients = self.router.aux_coefficients()
        self.compressed_experts = compressed_experts
        self.experts = build_expert_bank(
            self.num_experts,
            d_model,
            self.expert_hidden,
            activation,
            init_std,
            backend,
            merges_experts=self.merges_experts,
            expert_slots=expert_slots,
            expert_quant=expert_quant,
            expert_quant_group=expert_quant_group,
            expert_quant_keep=expert_quant_keep,
            compressed_experts=compressed_experts,
            compressed_width=compressed_width,
        )
        # 2 FLOPs per weight of one expert; the model's config overwrites it with its accounting's
        self.assignment_flops = (
            self.experts.flops_per_assignment()[0]
            if compressed_experts
            else 2 * sum(p[0].numel() for p in self.experts.parameters())
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

    @property
    def active_capacity_factor(self) -> float | None:
        """The capacity factor of the current mode: ``capacity_factor`` in training,
        ``eval_capacity_factor`` in eval mode (None: dropless)."""
        return self.capacity_factor if self.training else self.eval_capacity_factor

    def forward(
        self, x: Tensor, token_mask: Tensor | None = None, context: RoutingContext | None = None
    ) -> Tensor:
        shape = x.shape
        x_TD = x.reshape(-1, self.d_model)
        valid_T = None if token_mask is None else token_mask.reshape(-1).to(torch.bool)
        if valid_T is not None and valid_T.shape[0] != x_TD.shape[0]:
            raise ValueError(
                f"token_mask must have the leading shape of x {tuple(shape[:-1])}, "
                f"got {tuple(token_mask.shape)}"
            )

        if self.merges_experts:
            y_TD, records = self._merged_pass(x, valid_T)
        else:
            y_TD, records = self._experts_pass(self.router, x_TD, valid_T, context)
        chain_TD, step_TD = x_TD, y_TD
        for router in self.chain_routers:  # Chain-of-Experts: re-route on the previous output
            chain_TD = chain_TD + step_TD  # x⁽ᵗ⁾ = x⁽ᵗ⁻¹⁾ + MoE_t(x⁽ᵗ⁻¹⁾), the inner residual
            step_TD, step_records = self._experts_pass(router, chain_TD, valid_T, context)
            y_TD, records = y_TD + step_TD, records + step_records
        if self.momentum > 0 or self.momentum_step != 1.0:
            y_TD = self._momentum(y_TD, context)

        if self.should_record():
            self._record_all(records, valid_T)
        return y_TD.reshape(shape)

    def _experts_pass(
        self,
        router: torch.nn.Module,
        x_TD: Tensor,
        valid_T: Tensor | None,
        context: RoutingContext | None,
    ) -> tuple[Tensor, list[tuple[RouterOutput, RoutingDecision, int]]]:
        """One routed pass: route, dispatch, experts, combine (+ direct and shared outputs).
        Returns the output and what :meth:`_record` needs of it."""
        routed = router(x_TD, valid_T, context)
        decision = routed.decision
        if self.debug_uniform_routing:
            decision = self._uniform_decision(x_TD, valid_T)
        assigned = decision.num_assignments
        capacity_factor = self.active_capacity_factor
        if capacity_factor is not None:
            n_valid = x_TD.shape[0] if valid_T is None else int(valid_T.sum())
            capacity = dispatch.expert_capacity(
                capacity_factor, n_valid, self.top_k, self.num_experts
            )
            decision = dispatch.apply_capacity(decision, capacity)

        slotted = self._slotted(decision)  # merged experts: their shared weight slots
        y_TD = self.dispatcher.run(x_TD, slotted, self.experts)  # permute → experts → combine
        if routed.direct_TD is not None:
            y_TD = y_TD + routed.direct_TD.to(y_TD.dtype)
        y_TD = self._add_shared(x_TD, y_TD)

        # Analysis sees one decision per token and layer: Chain-of-Experts' first pass.
        if self.routing_observer is not None and router is self.router:
            self.routing_observer(self, decision, x_TD)
        return y_TD, [(routed, decision, assigned)]

    def _slotted(self, decision: RoutingDecision) -> RoutingDecision:
        """``decision`` over the experts' weight slots (itself when each expert has its own)."""
        if self.expert_slot is None:
            return decision
        expert_idx_N = self.expert_slot[decision.expert_idx_N]
        return RoutingDecision(
            token_idx_N=decision.token_idx_N,
            expert_idx_N=expert_idx_N,
            weight_N=decision.weight_N,
            tokens_per_expert_E=torch.bincount(expert_idx_N, minlength=self.expert_slots),
            num_tokens=decision.num_tokens,
            num_experts=self.expert_slots,
            dropped=decision.dropped,
        )

    def _add_shared(self, x_TD: Tensor, y_TD: Tensor) -> Tensor:
        if self.shared is None:
            return y_TD
        shared_TD = self.shared(x_TD)
        if self.shared_gate is not None:
            shared_TD = torch.sigmoid(self.shared_gate(x_TD)) * shared_TD
        return y_TD + shared_TD

    def _merged_pass(
        self, x_BLD: Tensor, valid_T: Tensor | None
    ) -> tuple[Tensor, list[tuple[RouterOutput, RoutingDecision, int]]]:
        """Lory (:mod:`moelab.layers.lory`): per segment, one FFN pass with the experts' weights
        merged by the router's segment weights; no dispatch. Pad tokens get zero routed output
        (as tokens without assignment elsewhere). Records every valid token as assigned to every
        expert, with its segment's weight: all experts' weights enter each token's FFN."""
        if not isinstance(self.dispatcher, dispatch.LocalDispatcher):
            raise ValueError("router 'lory' merges all experts locally: no expert parallelism")
        router: LoryRouter = self.router  # type: ignore[assignment]
        valid_BL = None if valid_T is None else valid_T.view(x_BLD.shape[:-1])
        routing = router.route(x_BLD, valid_BL)
        y_BLD = merged_experts_ffn(x_BLD, routing.weights_BSE, self.experts, router.segment_len)
        x_TD, y_TD = x_BLD.reshape(-1, self.d_model), y_BLD.reshape(-1, self.d_model)
        if valid_T is not None:
            y_TD = y_TD * valid_T[:, None].to(y_TD.dtype)
        y_TD = self._add_shared(x_TD, y_TD)
        routed = router.router_output(routing, valid_T, x_BLD.shape[1])
        if self.routing_observer is not None:
            self.routing_observer(self, routed.decision, x_TD)
        return y_TD, [(routed, routed.decision, routed.decision.num_assignments)]

    def _momentum(self, f_TD: Tensor, context: RoutingContext | None) -> Tensor:
        """MomentumSMoE's heavy ball: ``p = f + μ·p_prev`` passed on, ``γ·p`` returned."""
        p_prev = None if context is None else context.get(MOMENTUM_KEY)
        p_TD = f_TD if p_prev is None else f_TD + self.momentum * p_prev.to(f_TD.dtype)
        if context is not None:
            context.pass_on(MOMENTUM_KEY, p_TD)
        return self.momentum_step * p_TD

    def _record_all(
        self, records: list[tuple[RouterOutput, RoutingDecision, int]], valid_T: Tensor | None
    ) -> None:
        """Record each pass; with iterations, aux losses of the same name are summed (every
        iteration's router gets its full weight, as every layer's does) and statistics merged."""
        routers = [self.router, *self.chain_routers]
        losses: dict[str, Tensor] = {}
        stats = None
        for router, (routed, decision, assigned) in zip(routers, records, strict=True):
            self._record(router, routed, decision, valid_T, assigned)
            for name, value in self.aux_losses.items():
                losses[name] = losses[name] + value if name in losses else value
            stats = self.last_stats.merge(stats) if stats is not None else self.last_stats
        self.aux_losses, self.last_stats = losses, stats

    def _uniform_decision(self, x_TD: Tensor, valid_T: Tensor | None) -> RoutingDecision:
        k = self.top_k
        token_idx_N, expert_idx_N = uniform_assignment(
            x_TD.shape[0], self.num_experts, k, valid_T, x_TD.device
        )
        weight_N = torch.full(token_idx_N.shape, 1.0 / k, device=x_TD.device)
        return make_decision(token_idx_N, expert_idx_N, weight_N, x_TD.shape[0], self.num_experts)

    def _record(
        self,
        router: torch.nn.Module,
        routed: RouterOutput,
        decision: RoutingDecision,
        valid_T: Tensor | None,
        assigned: int,
    ) -> None:
        """Aux losses (with graph) and detached statistics of one pass of a training forward."""
        self.aux_losses = router.aux_losses(routed, valid_T)

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
                expert_flops=self._spent_flops(decision, n_valid),
            )

    def _spent_flops(self, decision: RoutingDecision, n_valid: Tensor) -> Tensor:
        """Expert FLOPs this pass computed: every assignment the dispatcher ran (capacity drops
        and null / zero-computation picks are not in the decision), or, for Lory, one merged
        expert per valid token (its decision lists every expert, but one FFN runs)."""
        computed = n_valid.cpu() if self.merges_experts else torch.tensor(decision.num_assignments)
        if self.compressed_experts:  # assignments of compressed experts cost their stand-in's
            _, stand_in = self.experts.flops_per_assignment()
            compressed = decision.tokens_per_expert_E[-self.compressed_experts :].sum().cpu()
            computed = computed - compressed
            return computed.to(torch.long) * self.assignment_flops + compressed * stand_in
        return computed.to(torch.long) * self.assignment_flops

    def extra_repr(self) -> str:
        optional = {  # shown when not at their default
            "eval_capacity_factor": (self.eval_capacity_factor, None),
            "expert_slots": (self.expert_slots, None),
            "iterations": (self.iterations, 1),
            "compressed_experts": (self.compressed_experts, 0),
            "momentum": (self.momentum, 0.0),
            "momentum_step": (self.momentum_step, 1.0),
        }
        return (
            f"router={self.router_name}, experts={self.num_experts}, top_k={self.top_k}, "
            f"granularity={self.granularity}, capacity_factor={self.capacity_factor}"
        ) + "".join(f", {k}={v}" for k, (v, off) in optional.items() if v != off)
