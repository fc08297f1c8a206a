"""Sub-MoE's clustering and subspace merge (Li et al. 2025, "Sub-MoE: Efficient Mixture-of-Expert
LLMs Compression via Subspace Expert Merging", arXiv 2506.23266).

* Clustering (the paper's "adaptive expert clustering"): experts whose outputs on calibration
  tokens are alike are grouped. moelab runs every expert on the same sampled tokens, takes the
  cosine similarity of the flattened outputs, and clusters by average linkage down to ``S``
  groups (deterministic; the paper uses K-means on the same similarity, with an adaptive number
  of clusters per layer, where moelab keeps one ``S``).
* Subspace merge ("experts union decomposition"): for each weight matrix (``out × in``: gate,
  up, down), the group's matrices are concatenated along ``in`` and decomposed jointly,
  ``[W_1 … W_n] = U Σ [V_1ᵀ … V_nᵀ]``, so ``U`` is a basis shared by the group and ``V_i`` is
  expert ``i``'s coordinates in it. The ``V_i`` are averaged with the experts' routing
  frequencies and the merged matrix is ``U_r Σ_r V̄_rᵀ``, keeping ``r`` directions of the shared
  basis (default ``min(out, in)``, the rank one expert's matrix can have; ``--subspace-rank``).
  With every direction kept this is the frequency-weighted average of the ``W_i``; with fewer it
  is that average projected on the group's dominant shared subspace (``U_r U_rᵀ W̄``), which
  drops the directions where the members disagree. Two identical experts merge exactly.

Simplified: the merged matrix is stored dense in its slot (the paper keeps ``U`` and ``V̄``
factored and compresses ``V̄`` further, "intra-expert compression"; a factored expert would need
a low-rank expert type in :mod:`moelab.layers`), so the parameter saving is the merge's alone.
Hidden units are not aligned by default (the paper does not); ``align=True`` aligns them first
as MC-SMoE does.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from moelab.compress.alignment import align_expert
from moelab.compress.merging import Groups
from moelab.layers.experts import GroupedExperts

__all__ = ["cluster_by_similarity", "expert_output_similarity", "subspace_merge", "merge_groups"]


@torch.no_grad()
def expert_output_similarity(experts: GroupedExperts, x_ND: Tensor) -> Tensor:
    """``[E, E]`` cosine similarity of the experts' outputs on the same tokens ``x_ND``."""
    e, n = experts.num_experts, x_ND.shape[0]
    x = x_ND.to(experts.w2_EFD.dtype).repeat(e, 1)
    y_END = experts(x, [n] * e).view(e, n, -1).double()
    unit = F.normalize(y_END.reshape(e, -1), dim=1)
    return unit @ unit.T


def cluster_by_similarity(sim_EE: Tensor, groups: int, counts_E: Tensor) -> Groups:
    """Average-linkage agglomerative clustering into ``groups`` clusters (the most similar pair
    of clusters merged first; ties: the lower ids). Each cluster lists its most used expert first
    (the alignment reference), then the others ascending; clusters in order of their lowest id."""
    clusters = [[e] for e in range(sim_EE.shape[0])]
    while len(clusters) > groups:
        best, pair = -float("inf"), (0, 1)
        for a in range(len(clusters)):
            for b in range(a + 1, len(clusters)):
                link = float(sim_EE[clusters[a]][:, clusters[b]].mean())
                if link > best:
                    best, pair = link, (a, b)
        a, b = pair
        clusters[a] = sorted(clusters[a] + clusters.pop(b))
    ordered = []
    for members in sorted(clusters):
        lead = max(members, key=lambda e: (int(counts_E[e]), -e))
        ordered.append([lead] + [e for e in members if e != lead])
    return ordered


def subspace_merge(mats_NOI: Tensor, weights_N: Tensor, rank: int | None = None) -> Tensor:
    """The merged ``[O, I]`` matrix of ``n`` matrices ``[n, O, I]``: joint SVD of their
    concatenation along ``I``, the expert parts ``V_i`` averaged with ``weights_N``, rebuilt from
    the first ``rank`` shared directions (None: ``min(O, I)``, the rank one expert's matrix can
    have, so a merge of identical matrices is exact)."""
    n, o, i = mats_NOI.shape
    joint = mats_NOI.double().permute(1, 0, 2).reshape(o, n * i)  # [W_1 … W_n]
    u, s, vh = torch.linalg.svd(joint, full_matrices=False)
    r = min(min(o, i) if rank is None else rank, len(s))
    v_NRI = vh[:r].reshape(r, n, i).permute(1, 0, 2)
    w = weights_N.double()
    w = torch.ones_like(w) if not w.sum() > 0 else w
    v_mean = torch.tensordot(w / w.sum(), v_NRI, dims=1)  # [r, I]
    return ((u[:, :r] * s[:r]) @ v_mean).to(mats_NOI.dtype)


def merge_groups(
    w13_EDF2: Tensor,
    w2_EFD: Tensor,
    groups: Groups,
    counts_E: Tensor,
    rank: int | None = None,
    align: bool = False,
) -> tuple[Tensor, Tensor]:
    """Merged ``[S, D, 2F]``, ``[S, F, D]``: per group and per matrix (gate, up, down as
    ``out × in``), :func:`subspace_merge` with the routing counts as weights."""
    f = w2_EFD.shape[1]
    gated = w13_EDF2.shape[2] == 2 * f
    out13, out2 = [], []
    for members in groups:
        ref = (w13_EDF2[members[0]], w2_EFD[members[0]])
        pairs = [ref] + [
            align_expert(ref, (w13_EDF2[e], w2_EFD[e])) if align else (w13_EDF2[e], w2_EFD[e])
            for e in members[1:]
        ]
        w13 = torch.stack([p[0] for p in pairs])  # [n, D, 2F]
        w2 = torch.stack([p[1] for p in pairs])  # [n, F, D]
        freq = counts_E[members]
        halves = w13.split(f, dim=2) if gated else (w13,)
        merged13 = [subspace_merge(h.transpose(1, 2), freq, rank).T for h in halves]  # [F, D]ᵀ
        out13.append(torch.cat(merged13, dim=1))
        out2.append(subspace_merge(w2.transpose(1, 2), freq, rank).T)  # down: [D, F] = out × in
    return torch.stack(out13), torch.stack(out2)
