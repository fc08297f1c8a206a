"""Where offloading meets the MoE block: a dispatcher that fetches only the experts with tokens.

:class:`~moelab.layers.MoE` runs its experts through ``moe.dispatcher`` (the same door expert
parallelism uses), so offloading needs no change to the layer: :class:`OffloadDispatcher`
permutes the rows as the local dispatcher does, asks the session for each expert that received
rows (hits first, then loads still in flight, then misses), runs that one expert on its rows with
the layer's own expert code (``GroupedExperts`` called on the fetched weights through
``torch.func.functional_call``, so the backend and the arithmetic are the fully loaded model's),
and combines. With low-precision copies (:mod:`moelab.serve.lowprec`) a missed expert whose
rows all have small gates is computed from its copy instead of fetched. A forward pre-hook on
the layer keeps the token mask and routing context of the call, which the next layer's router
needs for its prediction.

Decoding a few rows (``moelab generate``'s short step, :class:`~moelab.model.decode_step.FastStep`)
skips the layer's forward: the step routes, then calls :meth:`OffloadDispatcher.decode_rows`,
which runs the loaded short step's arithmetic (:func:`~moelab.model.decode_step.moe_rows`, one
matmul pair per chosen expert) on the fetched weights, so the offloaded step costs what the
loaded one does plus the cache's bookkeeping, and gives the same bits. Either way a layer's
misses are read together on the session's read pool (``read_workers``), not one after another.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torch.func import functional_call

from moelab.layers import dispatch
from moelab.layers.base import RoutingContext, RoutingDecision
from moelab.layers.experts import GroupedExperts
from moelab.model.decode_step import expert_rows, moe_rows
from moelab.serve.prefetch import predict_experts

__all__ = ["OffloadDispatcher"]


class OffloadDispatcher(dispatch.LocalDispatcher):
    """Runs layer ``layer``'s experts from ``session``'s cache (see module doc)."""

    def __init__(
        self,
        session: Any,  # moelab.serve.offload.OffloadSession (which imports this module)
        layer: int,
        experts: GroupedExperts,
        next_router: torch.nn.Module | None,
    ) -> None:
        self.session, self.layer, self.next_router = session, layer, next_router
        with torch.device("meta"):  # a one-expert shell: its weights are passed at each call
            self.shell = GroupedExperts(
                1, experts.d_model, experts.d_hidden, experts.activation, 1.0, experts.backend
            )
        self.valid_T: Tensor | None = None
        self.context: RoutingContext | None = None

    def remember_call(self, module: Any, args: tuple, kwargs: dict) -> None:
        """Forward pre-hook of the MoE layer: keep its token mask and context."""
        mask = kwargs.get("token_mask", args[1] if len(args) > 1 else None)
        self.valid_T = None if mask is None else mask.reshape(-1).to(torch.bool)
        self.context = kwargs.get("context", args[2] if len(args) > 2 else None)

    def run(self, x_TD: Tensor, decision: RoutingDecision, experts: Any) -> Tensor:
        perm = dispatch.permute(decision)
        x_ND = dispatch.gather(x_TD, perm)
        counts = perm.counts
        needed = [e for e, n in enumerate(counts) if n]
        low, remaining = self._start(x_TD, decision, needed)
        starts = [0]
        for n in counts:
            starts.append(starts[-1] + n)
        y_ND = x_ND.new_empty(x_ND.shape[0], x_ND.shape[1])
        for e in self.session.fetch_order(self.layer, needed):
            rows = slice(starts[e], starts[e + 1])
            if e in low:
                y_ND[rows] = self.session.lowprec.run(
                    self.layer, e, x_ND[rows], perm.weight_N[rows]
                )
                continue
            w13, w2 = self.session.fetch(self.layer, e, remaining)
            y_ND[rows] = functional_call(
                self.shell,
                {"w13_EDF2": w13[None], "w2_EFD": w2[None]},
                (x_ND[rows], [counts[e]], perm.weight_N[rows]),
            )
            remaining.discard((self.layer, e))
        return dispatch.combine(y_ND, perm, weighted=True)

    def decode_rows(self, x_TD: Tensor, decision: RoutingDecision, context: Any) -> Tensor:
        """:class:`~moelab.model.decode_step.FastStep`'s short MoE path for a few rows: the
        loaded model's arithmetic (:func:`~moelab.model.decode_step.moe_rows`) on the weights
        fetched here, held experts first, each unpinned once its rows are computed; a miss that
        HOBBIT's rule sends to its low-precision copy is computed from the copy, not read."""
        self.valid_T, self.context = None, context  # what the layer's pre-hook would keep
        session = self.session
        if x_TD.shape[0] == 1:
            needed = sorted(set(decision.expert_idx_N.tolist()))
        else:
            needed = [e for e, n in enumerate(decision.tokens_per_expert_E.tolist()) if n]
        low, remaining = self._start(x_TD, decision, needed)
        layer, activation = self.layer, self.shell.activation

        def expert_out(e: int, x_nD: Tensor) -> Tensor:
            if e in low:
                return session.lowprec.expert(layer, e, x_nD)
            return expert_rows(x_nD, *session.fetch(layer, e, remaining), activation)

        return moe_rows(
            x_TD,
            decision,
            expert_out,
            session.fetch_order(layer, needed),
            lambda e: remaining.discard((layer, e)),
        )

    def _start(
        self, x_TD: Tensor, decision: RoutingDecision, needed: list[int]
    ) -> tuple[set[int], set]:
        """What both paths do before computing the layer's ``needed`` experts: note the use,
        decide which misses come from low-precision copies (before any read), pin the experts
        that are read (until their rows are computed), start reading their misses together, then
        prefetch the next layer's guess. Returns the copies' experts and the pinned keys."""
        if torch.is_grad_enabled() and x_TD.requires_grad:
            raise RuntimeError("offloaded experts are read-only: run the model under no_grad")
        self.session.note_layer(self.layer, needed)
        low = self._low_precision(decision, x_TD.shape[0], needed)
        read = [e for e in needed if e not in low]
        remaining = {(self.layer, e) for e in read}
        self.session.read_ahead(self.layer, read, remaining)
        if self.next_router is not None and self.session.prefetch_enabled:
            guess = predict_experts(self.next_router, x_TD, self.valid_T, self.context)
            self.session.prefetch(self.layer + 1, guess, remaining)
        return low, remaining

    def _low_precision(self, d: RoutingDecision, num_tokens: int, needed: list[int]) -> set[int]:
        """The experts of ``needed`` served from their low-precision copies (HOBBIT's rule,
        :meth:`OffloadSession.use_low_precision`, on each row's gate over its token's top gate),
        decided before any read starts; empty without copies."""
        session = self.session
        if session.lowprec is None or not session.miss_threshold > 0:
            return set()
        w_N = d.weight_N.float()
        top_T = w_N.new_zeros(num_tokens).scatter_reduce_(0, d.token_idx_N, w_N, "amax")
        ratio_N = w_N / top_T[d.token_idx_N].clamp_min(torch.finfo(torch.float32).tiny)
        return {
            e
            for e in needed
            if session.use_low_precision(self.layer, e, ratio_N[d.expert_idx_N == e])
        }

    def __repr__(self) -> str:
        return f"OffloadDispatcher(layer={self.layer})"
