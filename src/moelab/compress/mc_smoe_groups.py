"""MC-SMoE's grouping and merge (Li et al., ICLR 2024, "Merge, Then Compress: Demystify
Efficient SMoE with Hints from Its Routing Policy", §3.1-3.2).

* Dominant experts: the ``S`` most frequently routed experts of a block on calibration tokens
  (the paper picks them globally with a per-layer number; moelab keeps ``S`` in every block,
  since one ``expert_slots`` describes the model).
* Grouping: every other expert joins the dominant expert whose router-logit vector is most
  similar (cosine over calibration tokens of the logit column ``x·w_e``: experts the router
  scores alike are taken as alike).
* Merge: each member's hidden units are permutation-aligned to the dominant expert
  (:mod:`moelab.compress.alignment`), then the group's weights are averaged, weighted by the
  members' routing frequencies.

The paper's "then compress" step (low-rank and pruning of the merged experts) is not done: a
low-rank expert would need a factored expert type in :mod:`moelab.layers`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from moelab.compress.alignment import align_expert
from moelab.compress.merging import Groups, weighted_average

__all__ = ["dominant_groups", "merge_groups"]


def dominant_groups(counts_E: Tensor, logits_NE: Tensor, slots: int) -> Groups:
    """``slots`` groups: each led by a dominant expert (most routed; ties: the lower id), the
    groups in ascending order of their dominant expert, members in ascending id after it."""
    order = torch.argsort(-counts_E, stable=True)
    dominant = order[:slots].sort().values.tolist()
    unit = F.normalize(logits_NE.double(), dim=0)  # each expert's logit column, unit length
    sim_EE = unit.T @ unit
    groups = [[d] for d in dominant]
    for e in range(len(counts_E)):
        if e not in dominant:
            best = int(torch.argmax(sim_EE[e, dominant]))  # first on ties: the lower id
            groups[best].append(e)
    return groups


def merge_groups(
    w13_EDF2: Tensor, w2_EFD: Tensor, groups: Groups, counts_E: Tensor, align: bool = True
) -> tuple[Tensor, Tensor]:
    """The merged weights ``[S, D, 2F]``, ``[S, F, D]``: per group, members aligned to its first
    expert (when ``align``) and averaged with their ``counts_E`` as weights."""
    out13, out2 = [], []
    for members in groups:
        ref = (w13_EDF2[members[0]], w2_EFD[members[0]])
        pairs = [ref] + [
            align_expert(ref, (w13_EDF2[e], w2_EFD[e])) if align else (w13_EDF2[e], w2_EFD[e])
            for e in members[1:]
        ]
        freq = counts_E[members]
        out13.append(weighted_average(torch.stack([p[0] for p in pairs]), freq))
        out2.append(weighted_average(torch.stack([p[1] for p in pairs]), freq))
    return torch.stack(out13), torch.stack(out2)
