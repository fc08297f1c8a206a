"""Sums over data-parallel ranks, handed to the layers from outside.

A few statistics must be summed over every rank that trains a replica of the model: ReMoE's
router counts before the λ update, the step's expert loads before a between-step bias update, the
expert counts of a global-batch balance loss. The layers never ask whether they run distributed,
nor which process group to use: a part that needs such a sum inherits :class:`SumsOverRanks`, and
the parallelism layer (:mod:`moelab.distributed`, which knows the process group and the device its
backend talks on) hands it a :class:`RankSum` with :meth:`SumsOverRanks.set_rank_sum`. Until then
(a run in one process) the local value is the sum, and nothing is communicated.
"""

from __future__ import annotations

from typing import Protocol

from torch import Tensor

__all__ = ["RankSum", "SumsOverRanks"]


class RankSum(Protocol):
    """A collective that names its process group: ``t`` summed over the group's ranks, returned
    with ``t``'s shape, dtype and device. Every rank of the group calls it, in the same order."""

    def __call__(self, t: Tensor) -> Tensor: ...


class SumsOverRanks:
    """Mixin of a part whose statistics are summed over data-parallel ranks (see the module
    docstring). ``rank_sum`` is None in one process."""

    rank_sum: RankSum | None = None

    def set_rank_sum(self, rank_sum: RankSum | None) -> None:
        """Called by the parallelism layer: the sum over the ranks that share this part."""
        self.rank_sum = rank_sum

    def sum_over_ranks(self, t: Tensor) -> Tensor:
        """``t`` summed over the ranks (``t`` itself in one process)."""
        return t if self.rank_sum is None else self.rank_sum(t)
