"""Neuron alignment of experts before their weights are averaged (MC-SMoE, Li et al., ICLR 2024,
"Merge, Then Compress", §3.2 "permutation alignment"; the weight-matching idea of Ainsworth et
al. 2023, "Git Re-Basin").

An expert's hidden units can be listed in any order without changing its function: permuting
the columns of the up projection(s) and the rows of the down projection together gives the same
expert. Two experts trained apart therefore need not store "the same" unit at the same index,
and averaging them index by index mixes unrelated units. Alignment finds the permutation of one
expert's units that best matches another's (largest summed dot product of each unit's weights:
its gate and up columns and its down row, concatenated) by a linear assignment, and applies it.

Weights are in moelab's layout (:class:`~moelab.layers.experts.GroupedExperts`): ``w13_DF2``
``[D, 2F]`` (gate half then up half; ``[D, F]`` for non-gated activations) and ``w2_FD``
``[F, D]``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from moelab.compress.assignment import linear_sum_assignment

__all__ = ["align_expert", "hidden_unit_features", "matching_permutation", "permute_hidden"]


def _gated(w13_DF2: Tensor, w2_FD: Tensor) -> bool:
    return w13_DF2.shape[1] == 2 * w2_FD.shape[0]


def hidden_unit_features(w13_DF2: Tensor, w2_FD: Tensor) -> Tensor:
    """``[F, 2D or 3D]``: each hidden unit's weights (gate column, up column, down row)."""
    f = w2_FD.shape[0]
    parts = [w13_DF2[:, :f].T, w13_DF2[:, f:].T] if _gated(w13_DF2, w2_FD) else [w13_DF2.T]
    return torch.cat([*parts, w2_FD], dim=1)


def permute_hidden(w13_DF2: Tensor, w2_FD: Tensor, perm_F: Tensor) -> tuple[Tensor, Tensor]:
    """The same expert with hidden unit ``i`` taken from unit ``perm_F[i]``."""
    f = w2_FD.shape[0]
    cols = torch.cat([perm_F, perm_F + f]) if _gated(w13_DF2, w2_FD) else perm_F
    return w13_DF2[:, cols], w2_FD[perm_F]


def matching_permutation(ref: tuple[Tensor, Tensor], other: tuple[Tensor, Tensor]) -> Tensor:
    """``perm_F`` such that ``permute_hidden(*other, perm_F)`` matches ``ref`` best: the
    assignment maximising ``Σ_i ⟨ref unit i, other unit perm[i]⟩`` (computed in float64)."""
    a = hidden_unit_features(*ref).double()
    b = hidden_unit_features(*other).double()
    sim = (a @ b.T).cpu().numpy()
    rows, cols = linear_sum_assignment(-sim)
    perm = torch.empty(len(rows), dtype=torch.long)
    perm[torch.as_tensor(rows)] = torch.as_tensor(cols, dtype=torch.long)
    return perm.to(ref[1].device)


def align_expert(ref: tuple[Tensor, Tensor], other: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
    """``other``'s weights with its hidden units reordered to match ``ref``'s."""
    return permute_hidden(*other, matching_permutation(ref, other))
