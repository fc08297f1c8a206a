"""Pieces shared by token-choice routers: flat assignments from a dense selection, the sequence
structure a sequence-wise balance loss needs, and the data-parallel sums of a global one (through
the :class:`~moelab.layers.ranks.RankSum` the parallelism layer hands the router).

Not a router (nothing here is registered); :mod:`~moelab.layers.routers.topk`,
:mod:`~moelab.layers.routers.top_p`, :mod:`~moelab.layers.routers.null` and
:mod:`~moelab.layers.routers.aux_free` use it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from moelab.layers.base import RoutingContext
from moelab.layers.ranks import RankSum
from moelab.layers.routers.base import RouterOutput

BALANCE_SCOPES = ("batch", "sequence", "global")


@dataclass(frozen=True)
class SequencedRouterOutput(RouterOutput):
    """A router output that also knows the sequence length of its rows (rows ``[b·L, (b+1)·L)``
    are sequence ``b``), for sequence-wise balance losses; None when not needed."""

    seq_len: int | None = None


def check_balance_scope(value: object) -> None:
    if value not in BALANCE_SCOPES:
        allowed = ", ".join(repr(s) for s in BALANCE_SCOPES)
        raise ValueError(f"balance_scope must be one of {allowed}, got {value!r}")


def sequence_length(context: RoutingContext | None, num_tokens: int, setting: str) -> int:
    """L of the ``[B, L]`` batch the ``num_tokens`` flattened rows came from, read from the shape of
    ``context.token_ids`` (the model's input ids, leading shape of x). ``setting`` names the option
    that needs it, for the error."""
    token_ids = None if context is None else context.token_ids
    if token_ids is None or token_ids.dim() < 2:
        raise ValueError(
            f"{setting} needs the sequence structure: call the layer with a RoutingContext whose "
            "token_ids have shape [B, L] (TransformerLM does)"
        )
    seq_len = int(token_ids.shape[-1])
    if token_ids.numel() != num_tokens:
        raise ValueError(
            f"{setting}: context.token_ids has {token_ids.numel()} tokens, x has {num_tokens}"
        )
    return seq_len


def selection_mask(
    token_idx_N: Tensor, expert_idx_N: Tensor, num_tokens: int, num_experts: int
) -> Tensor:
    """bool ``[T, E]``: True where (token, expert) is an assignment."""
    mask_TE = torch.zeros(num_tokens, num_experts, dtype=torch.bool, device=token_idx_N.device)
    mask_TE[token_idx_N, expert_idx_N] = True
    return mask_TE


def flat_assignments(
    select_TE: Tensor, weight_TE: Tensor, valid_T: Tensor | None
) -> tuple[Tensor, Tensor, Tensor]:
    """``(token_idx_N, expert_idx_N, weight_N)`` of the selected pairs of valid tokens."""
    if valid_T is not None:
        select_TE = select_TE & valid_T[:, None]
    token_idx_N, expert_idx_N = select_TE.nonzero(as_tuple=True)
    return token_idx_N, expert_idx_N, weight_TE[token_idx_N, expert_idx_N]


def data_parallel_sum(rank_sum: RankSum | None, *counts: Tensor) -> list[Tensor]:
    """``counts`` (detached, float64) summed over data-parallel ranks by ``rank_sum``, in one
    collective; unchanged when ``rank_sum`` is None (one process)."""
    out = [c.detach().to(torch.float64).reshape(-1) for c in counts]
    if rank_sum is None:
        return [o.reshape(c.shape) for o, c in zip(out, counts, strict=True)]
    summed = rank_sum(torch.cat(out)).split([o.numel() for o in out])
    return [s.reshape(c.shape) for s, c in zip(summed, counts, strict=True)]
