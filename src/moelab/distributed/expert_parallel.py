"""Expert parallelism: the experts of each MoE layer split over a group of ranks, tokens exchanged
with all-to-all.

Applied from outside the model (:func:`apply_expert_parallel`, as torchtitan's parallelize
functions do): each :class:`~moelab.layers.MoE` keeps its router and shared experts, its
``experts`` keep only their contiguous block of ``E / ep`` experts, and its ``dispatcher`` becomes
an :class:`ExpertParallelDispatcher`. The layer's code is unchanged: it still calls
``dispatcher.permute`` → ``experts(...)`` → ``dispatcher.combine``.

One forward of one layer on rank ``r`` of the expert-parallel group (``P`` ranks, ``L = E / P``
local experts each; rank ``q`` owns experts ``[q·L, (q+1)·L)``):

1. sort this rank's assignments by expert (the local :func:`~moelab.layers.dispatch.permute`) and
   gather their rows; they are now grouped by destination rank;
2. exchange the per-expert row counts (``[P, L]`` integers, one fixed-size all-to-all);
3. send the rows with ``all_to_all_single`` (variable split sizes, dropless): rank ``q`` receives,
   from every source rank in turn, the rows of its experts, each source's rows sorted by expert;
4. reorder the received rows by local expert (stable, so source order is kept inside an expert)
   and run the local experts on them, without gates;
5. undo the reorder, send the outputs back with the reverse all-to-all, and combine them on the
   source rank, where the gate weights are applied (so the gates' gradients stay local).

ReLU routing (a variable number of experts per token, possibly none) needs nothing special: only
counts travel. A rank with no tokens, or experts with no rows, still joins both all-to-alls in the
forward and in the backward, with zero-size splits.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor, nn

from moelab.layers import MoE
from moelab.layers.base import RoutingDecision
from moelab.layers.dispatch import Dispatched, Dispatcher, combine, gather, permute

__all__ = [
    "CommClock",
    "ExpertParallelDispatcher",
    "ShardedParam",
    "all_to_all",
    "apply_expert_parallel",
]


class CommClock:
    """Wall time spent in the all-to-alls (forward and backward, waiting for the other ranks
    included), summed over every layer that shares this clock."""

    def __init__(self) -> None:
        self.seconds = 0.0

    def take(self) -> float:
        """The time since the last ``take`` (and start again from 0)."""
        seconds, self.seconds = self.seconds, 0.0
        return seconds


def _all_to_all_single(
    out: Tensor,
    x: Tensor,
    out_splits: list[int] | None,
    in_splits: list[int] | None,
    group: dist.ProcessGroup | None,
    clock: CommClock | None,
) -> None:
    start = time.perf_counter()
    dist.all_to_all_single(out, x, out_splits, in_splits, group=group)
    if clock is not None:
        clock.seconds += time.perf_counter() - start


class _AllToAll(torch.autograd.Function):
    """``all_to_all_single`` of rows with variable split sizes; its backward is the reverse
    exchange of the gradients."""

    @staticmethod
    def forward(ctx, x, out_splits, in_splits, group, clock):  # type: ignore[override]
        ctx.out_splits, ctx.in_splits, ctx.group, ctx.clock = out_splits, in_splits, group, clock
        out = x.new_empty((sum(out_splits), *x.shape[1:]))
        _all_to_all_single(out, x.contiguous(), out_splits, in_splits, group, clock)
        return out

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        grad_in = grad_out.new_empty((sum(ctx.in_splits), *grad_out.shape[1:]))
        _all_to_all_single(
            grad_in, grad_out.contiguous(), ctx.in_splits, ctx.out_splits, ctx.group, ctx.clock
        )
        return grad_in, None, None, None, None


def all_to_all(
    x: Tensor,
    out_splits: list[int],
    in_splits: list[int],
    group: dist.ProcessGroup | None,
    clock: CommClock | None = None,
) -> Tensor:
    """Send ``in_splits[q]`` consecutive rows of ``x`` to rank ``q`` of ``group`` and receive
    ``out_splits[q]`` rows from it (differentiable; ``clock`` adds up the time, backward
    included)."""
    return _AllToAll.apply(x, out_splits, in_splits, group, clock)


@dataclass(frozen=True)
class _Exchange:
    """What the return trip of one forward needs."""

    send_splits: list[int]  # rows this rank sent to each rank of the group
    recv_splits: list[int]  # rows it received from each
    order_R: Tensor  # received rows → rows sorted by local expert
    inverse_R: Tensor  # and back


class ExpertParallelDispatcher(Dispatcher):
    """Rows to the rank that owns their expert and back, with two all-to-alls (see the module
    docstring); ``moe.experts`` holds this rank's ``num_local`` experts."""

    def __init__(
        self,
        group: dist.ProcessGroup | None,
        ep_size: int,
        ep_rank: int,
        num_experts: int,
        clock: CommClock | None = None,
    ) -> None:
        if num_experts % ep_size:
            raise ValueError(
                f"expert_parallel: {ep_size} ranks must divide the {num_experts} experts"
            )
        self.group, self.ep_size, self.ep_rank = group, ep_size, ep_rank
        self.num_experts = num_experts
        self.num_local = num_experts // ep_size
        self.clock = clock

    @property
    def first_expert(self) -> int:
        return self.ep_rank * self.num_local

    def permute(
        self, x_TD: Tensor, decision: RoutingDecision, pad_limit: float = 0.0
    ) -> Dispatched:
        P, L = self.ep_size, self.num_local
        perm = permute(decision)  # no padding: rows travel, so equal blocks buy nothing here
        x_ND = gather(x_TD, perm)
        send_PL = perm.counts_E.to(torch.long).reshape(P, L)
        recv_PL = torch.empty_like(send_PL)
        _all_to_all_single(recv_PL, send_PL.contiguous(), None, None, self.group, self.clock)
        send_splits = send_PL.sum(1).tolist()
        recv_splits = recv_PL.sum(1).tolist()
        x_RD = all_to_all(x_ND, recv_splits, send_splits, self.group, self.clock)
        # received rows are grouped (source rank, local expert); the experts want (expert, source)
        expert_of_row = torch.arange(L, device=recv_PL.device).repeat(P)
        expert_R = torch.repeat_interleave(expert_of_row, recv_PL.reshape(-1))
        order_R = torch.argsort(expert_R.to(torch.int32), stable=True)
        inverse_R = torch.empty_like(order_R)
        inverse_R[order_R] = torch.arange(order_R.numel(), device=order_R.device)
        counts = recv_PL.sum(0).tolist()
        x_local = x_RD.index_select(0, order_R)
        state = _Exchange(send_splits, recv_splits, order_R, inverse_R)
        return Dispatched(x_local, counts, None, perm, state)

    def combine(self, y_ND: Tensor, dispatched: Dispatched) -> Tensor:
        ex: _Exchange = dispatched.state
        y_RD = y_ND.index_select(0, ex.inverse_R)
        y_back = all_to_all(y_RD, ex.send_splits, ex.recv_splits, self.group, self.clock)
        return combine(y_back, dispatched.perm, weighted=False)

    def __repr__(self) -> str:
        lo = self.first_expert
        return (
            f"ExpertParallelDispatcher(rank {self.ep_rank} of {self.ep_size}, experts "
            f"{lo}..{lo + self.num_local - 1} of {self.num_experts})"
        )


@dataclass(frozen=True)
class ShardedParam:
    """A parameter of which this rank holds rows ``[offset, offset + local rows)`` of dim 0 of
    the full ``global_shape`` tensor (the experts it owns)."""

    global_shape: tuple[int, ...]
    offset: int


def apply_expert_parallel(
    model: nn.Module,
    group: dist.ProcessGroup | None,
    ep_size: int,
    ep_rank: int,
    clock: CommClock | None = None,
) -> dict[str, ShardedParam]:
    """Split the experts of every MoE layer of ``model`` over ``ep_size`` ranks (in place).

    Rank ``ep_rank`` keeps experts ``[ep_rank·L, (ep_rank+1)·L)``, ``L = E / ep_size``, of each
    layer (copied out of the full weights, which every rank built from the same seed) and gets an
    :class:`ExpertParallelDispatcher` (timing its all-to-alls on ``clock``, when given). Returns
    the sharded parameters by name (what gradient synchronisation, clipping and checkpoints need
    to know).
    """
    sharded: dict[str, ShardedParam] = {}
    for name, module in model.named_modules():
        if not isinstance(module, MoE):
            continue
        if module.compressed_experts:
            raise ValueError(
                "model.ffn.compressed_experts: expert parallelism shards full experts only; "
                "train a model with compressed experts without it"
            )
        dispatcher = ExpertParallelDispatcher(group, ep_size, ep_rank, module.num_experts, clock)
        experts = module.experts
        lo, n = dispatcher.first_expert, dispatcher.num_local
        for pname, param in list(experts.named_parameters(recurse=False)):
            full = tuple(param.shape)
            local = nn.Parameter(
                param.detach()[lo : lo + n].clone(), requires_grad=param.requires_grad
            )
            setattr(experts, pname, local)
            prefix = f"{name}.experts." if name else "experts."
            sharded[prefix + pname] = ShardedParam(full, lo)
        experts.num_experts = n
        module.dispatcher = dispatcher
    return sharded
