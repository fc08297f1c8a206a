"""Token permutation: the speed-critical glue between a router and the experts.

``permute`` sorts a decision's assignments by expert once (stable, so token order is kept inside an
expert); ``gather`` builds the expert-sorted input rows; ``combine`` scales expert outputs by their
gate weights and scatter-adds them back to token rows. Capacity limiting is a pure function on
decisions, applied before permutation.

:class:`Dispatcher` wraps the three for the MoE block (``moe.dispatcher``): ``dispatch`` hands the
experts their rows, ``undispatch`` brings the experts' outputs back to token rows.
:class:`LocalDispatcher` (the default) runs them in this process; an expert-parallel dispatcher
(``moelab.distributed``: rows exchanged with an all-to-all to the rank that holds their expert) is
another subclass with the same contract, installed on the layer from outside.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from moelab.layers.base import RoutingDecision

# Refuse capacity buffers beyond this many assignment slots: a huge capacity factor must be a clear
# error, not a terabyte allocation.
MAX_CAPACITY_SLOTS = 1 << 31


@dataclass(frozen=True)
class Permutation:
    """Assignments of a decision sorted by expert, optionally padded to equal-size expert blocks.

    Attributes:
        token_idx_N: source token row of each sorted row (``num_tokens`` for a padding row).
        weight_N: gate weight of each sorted row (0 for padding rows).
        counts_E: assignments per expert (long tensor), in expert order, before padding.
        counts: rows per expert as Python ints (split sizes for the experts): ``counts_E`` when
            unpadded, ``[C] * E`` when padded to capacity C.
        num_tokens: T, rows of the output.
        padded: rows form E blocks of C (a batched matmul runs them all at once); padding rows
            read a zero row and are combined with weight 0.
    """

    token_idx_N: Tensor
    weight_N: Tensor
    counts_E: Tensor
    counts: list[int]
    num_tokens: int
    padded: bool = False


def _narrow_keys(expert_idx_N: Tensor, num_experts: int) -> Tensor:
    """Expert ids in the narrowest integer type: torch's stable sort of int16/int32 keys is a radix
    sort, over 10x faster on CPU than sorting the int64 ids."""
    if num_experts <= torch.iinfo(torch.int16).max:
        return expert_idx_N.to(torch.int16)
    return expert_idx_N.to(torch.int32)


def permute(decision: RoutingDecision, pad_limit: float = 0.0) -> Permutation:
    """Sort assignments by expert with one stable argsort.

    With ``pad_limit > 0`` the rows are laid out in E equal blocks of ``C = max count`` (padding
    rows point at a zero row) whenever that costs at most ``pad_limit`` times the real rows: one
    batched matmul over equal blocks is several times faster on CPU than E small matmuls when the
    experts are narrow (fine-grained), and as fast when they are wide. Nothing is ever dropped.
    """
    order_N = torch.argsort(_narrow_keys(decision.expert_idx_N, decision.num_experts), stable=True)
    counts_E = decision.tokens_per_expert_E
    counts = counts_E.tolist()
    token_idx_N = decision.token_idx_N[order_N]
    weight_N = decision.weight_N[order_N]
    num_rows, num_experts = len(order_N), len(counts)
    capacity = max(counts, default=0)
    if pad_limit <= 0 or num_rows == 0 or capacity * num_experts > pad_limit * num_rows:
        return Permutation(token_idx_N, weight_N, counts_E, counts, decision.num_tokens)
    # Row i of expert e (sorted order) goes to slot e·C + (i − start_e).
    starts_E = torch.cumsum(counts_E, 0) - counts_E
    sorted_expert_N = decision.expert_idx_N[order_N]
    slot_N = torch.arange(num_rows, device=order_N.device) + (
        sorted_expert_N * capacity - starts_E[sorted_expert_N]
    )
    num_slots = capacity * num_experts
    token_idx_S = token_idx_N.new_full((num_slots,), decision.num_tokens)
    token_idx_S[slot_N] = token_idx_N
    weight_S = weight_N.new_zeros(num_slots).index_copy(0, slot_N, weight_N)
    return Permutation(
        token_idx_S, weight_S, counts_E, [capacity] * num_experts, decision.num_tokens, True
    )


def gather(x_TD: Tensor, perm: Permutation) -> Tensor:
    """Expert-sorted input rows ``x_ND`` (one row per assignment or padding slot)."""
    if perm.padded:  # padding slots read row T, a zero row
        x_TD = torch.cat([x_TD, x_TD.new_zeros(1, x_TD.shape[-1])])
    return x_TD.index_select(0, perm.token_idx_N)


def combine(y_ND: Tensor, perm: Permutation, weighted: bool = False) -> Tensor:
    """``y_TD[t] = Σ_{assignments a of t} weight_a · y_ND[a]`` (tokens with none stay 0).

    ``weighted=True``: the rows already carry their gate weights (the experts applied them).
    """
    weighted_ND = y_ND if weighted else y_ND * perm.weight_N.to(y_ND.dtype)[:, None]
    rows = perm.num_tokens + int(perm.padded)  # padding rows land in a discarded extra row
    y_TD = y_ND.new_zeros(rows, y_ND.shape[-1]).index_add(0, perm.token_idx_N, weighted_ND)
    return y_TD[: perm.num_tokens] if perm.padded else y_TD


def expert_capacity(
    capacity_factor: float, num_valid_tokens: int, top_k: float, num_experts: int
) -> int:
    """Switch-style capacity: ``ceil(capacity_factor · T · k / E)`` slots per expert."""
    slots = math.ceil(capacity_factor * num_valid_tokens * top_k / num_experts)
    if slots * num_experts > MAX_CAPACITY_SLOTS:
        raise ValueError(
            f"capacity_factor={capacity_factor} gives {slots} slots per expert x {num_experts} "
            f"experts, over the limit of {MAX_CAPACITY_SLOTS} assignment slots; use a smaller "
            "capacity_factor or capacity_factor=None (dropless)"
        )
    return slots


def apply_capacity(decision: RoutingDecision, capacity: int) -> RoutingDecision:
    """Drop assignments beyond ``capacity`` per expert, earlier tokens first (Switch's priority).

    Exactly ``Σ_e max(0, count_e − capacity)`` assignments are dropped; the result carries that
    number in ``dropped``.
    """
    expert_idx_N = decision.expert_idx_N
    # Order by (expert, token) so "first `capacity` of each expert" means the earliest tokens.
    key_N = expert_idx_N * max(decision.num_tokens, 1) + decision.token_idx_N
    order_N = torch.argsort(key_N, stable=True)
    counts_E = decision.tokens_per_expert_E
    starts_E = torch.cumsum(counts_E, 0) - counts_E
    sorted_expert_N = expert_idx_N[order_N]
    rank_N = torch.arange(order_N.numel(), device=order_N.device) - starts_E[sorted_expert_N]
    keep_N = torch.empty_like(rank_N, dtype=torch.bool)
    keep_N[order_N] = rank_N < capacity
    kept_expert_N = expert_idx_N[keep_N]
    return RoutingDecision(
        token_idx_N=decision.token_idx_N[keep_N],
        expert_idx_N=kept_expert_N,
        weight_N=decision.weight_N[keep_N],
        tokens_per_expert_E=counts_E.clamp(max=capacity),
        num_tokens=decision.num_tokens,
        num_experts=decision.num_experts,
        dropped=(counts_E - capacity).clamp_min(0).sum(),
    )


@dataclass(frozen=True)
class Dispatched:
    """What a dispatcher hands to the experts, and what it needs to bring their outputs back.

    Attributes:
        x_ND: the experts' input rows, sorted by (local) expert.
        counts: rows per expert of ``moe.experts`` (Python ints), in order.
        weight_N: the gate of each row when the experts apply it (``GroupedExperts.forward``'s
            ``weight_N``); None when :meth:`Dispatcher.combine` applies it instead.
        perm: the permutation of this process's own assignments.
        state: anything else the dispatcher keeps between the two calls.
    """

    x_ND: Tensor
    counts: list[int]
    weight_N: Tensor | None
    perm: Permutation
    state: Any = None


class Dispatcher:
    """Moves a decision's rows to the experts (:meth:`permute`) and their outputs back to token
    rows (:meth:`combine`); the MoE block calls ``experts(d.x_ND, d.counts, d.weight_N)`` in
    between. Subclasses decide where the experts are."""

    def permute(
        self, x_TD: Tensor, decision: RoutingDecision, pad_limit: float = 0.0
    ) -> Dispatched:
        raise NotImplementedError

    def combine(self, y_ND: Tensor, dispatched: Dispatched) -> Tensor:
        raise NotImplementedError

    def run(self, x_TD: Tensor, decision: RoutingDecision, experts: Any) -> Tensor:
        """Token rows through their experts and back: :meth:`permute` → ``experts`` →
        :meth:`combine`. A subclass may fuse the three."""
        dispatched = self.permute(x_TD, decision, experts.pad_limit(x_TD))
        y_ND = experts(dispatched.x_ND, dispatched.counts, dispatched.weight_N)
        return self.combine(y_ND, dispatched)


class LocalDispatcher(Dispatcher):
    """Every expert is in this process: :func:`permute`, :func:`gather`, and :func:`combine` of
    the outputs, which the experts have already multiplied by their gates."""

    def permute(
        self, x_TD: Tensor, decision: RoutingDecision, pad_limit: float = 0.0
    ) -> Dispatched:
        perm = permute(decision, pad_limit=pad_limit)
        return Dispatched(gather(x_TD, perm), perm.counts, perm.weight_N, perm)

    def combine(self, y_ND: Tensor, dispatched: Dispatched) -> Tensor:
        return combine(y_ND, dispatched.perm, weighted=True)

    def __repr__(self) -> str:
        return "LocalDispatcher()"
