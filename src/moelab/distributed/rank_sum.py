"""The sums over ranks that :mod:`moelab.distributed` hands to the parts of a model (and to the
trainer's between-step hooks) that need one: :class:`GroupSum` names its process group and the
device its backend communicates on, so the layers never ask either (see
:mod:`moelab.layers.ranks`)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from moelab.layers.ranks import RankSum, SumsOverRanks

__all__ = ["GroupSum", "hand_rank_sum"]


class GroupSum:
    """``t`` summed over the ranks of ``group`` (an all-reduce), moved to ``device`` for the
    backend (CPU for gloo, this rank's GPU for nccl) and back to where it came from.

    A communicator is shared, never copied: a deep copy of a module holding one (e.g. an
    evaluation copy of the model) holds the same."""

    def __init__(self, group: dist.ProcessGroup, device: torch.device) -> None:
        self.group = group
        self.device = device

    def __call__(self, t: Tensor) -> Tensor:
        out = t.to(self.device, copy=True)
        dist.all_reduce(out, group=self.group)
        return out.to(t.device)

    def __deepcopy__(self, memo: dict[int, Any]) -> GroupSum:
        return self

    def __repr__(self) -> str:
        return f"GroupSum({dist.get_world_size(self.group)} ranks, {self.device})"


def hand_rank_sum(parts: Iterable[object], rank_sum: RankSum | None) -> None:
    """Give ``rank_sum`` to every part that sums statistics over ranks: a model's modules (all of
    them, searched) and between-step hooks (taken as they are)."""
    for part in parts:
        found = part.modules() if isinstance(part, nn.Module) else [part]
        for obj in found:
            if isinstance(obj, SumsOverRanks):
                obj.set_rank_sum(rank_sum)
