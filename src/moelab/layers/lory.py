"""Lory's compute path: soft expert merging per segment (Zhong et al. 2024, arXiv 2405.03133).

Instead of dispatching tokens to experts, every segment of every sequence gets ONE FFN whose
weights are the experts' weights averaged with the segment's routing weights
(:class:`~moelab.layers.routers.lory.LoryRouter`): ``θ̄_{b,s} = Σ_e w_{b,s,e} θ_e``. All tokens of
the segment then go through that FFN in one batched matmul. Merging costs ``E`` multiply-adds per
expert parameter once per segment, amortised over its ``segment_len`` tokens; the per-token
compute is one expert's FFN.

The merge reads :class:`~moelab.layers.experts.GroupedExperts`' parameters directly
(``w13_EDF2: [E, D, 2F]`` for SwiGLU, ``[E, D, F]`` otherwise; ``w2_EFD: [E, F, D]``), so a
Lory layer holds exactly the parameters of an ordinary MoE layer and its checkpoints load into
either.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from moelab.layers.dense import activate
from moelab.layers.experts import GroupedExperts


def merged_experts_ffn(
    x_BLD: Tensor, weights_BSE: Tensor, experts: GroupedExperts, segment_len: int
) -> Tensor:
    """Each segment's tokens through the FFN of its merged weights, ``[B, L, D]``.

    ``weights_BSE[b, s]`` merges the experts for tokens ``s·T .. (s+1)·T − 1`` of sequence ``b``
    (``T = segment_len``, ``S = ceil(L / T)``; the last segment may be shorter). The merged
    weights are ``[B, S, D, 2F]`` / ``[B, S, F, D]`` tensors made by one einsum each (in the
    parameters' precision, at least float32), then cast to the input's dtype for the matmuls.
    """
    B, L, D = x_BLD.shape
    S = math.ceil(L / segment_len)
    if weights_BSE.shape[:2] != (B, S):
        raise ValueError(
            f"weights_BSE must be [{B}, {S}, E] for {L} tokens in segments of {segment_len}, "
            f"got {tuple(weights_BSE.shape)}"
        )
    w13_BSDF2, w2_BSFD = merge_expert_weights(weights_BSE, experts)
    pad = S * segment_len - L
    x_BSTD = F.pad(x_BLD, (0, 0, 0, pad)).view(B, S, segment_len, D)
    h_BSTF2 = torch.matmul(x_BSTD, w13_BSDF2.to(x_BLD.dtype))
    y_BSTD = torch.matmul(activate(h_BSTF2, experts.activation), w2_BSFD.to(x_BLD.dtype))
    return y_BSTD.reshape(B, S * segment_len, D)[:, :L]


def merge_expert_weights(weights_BSE: Tensor, experts: GroupedExperts) -> tuple[Tensor, Tensor]:
    """``Σ_e w_{b,s,e} θ_e`` for both projections: ``[B, S, D, 2F]`` and ``[B, S, F, D]``."""
    w13_EDF2, w2_EFD = experts.w13_EDF2, experts.w2_EFD
    dtype = torch.promote_types(w13_EDF2.dtype, torch.float32)
    with torch.autocast(device_type=w13_EDF2.device.type, enabled=False):
        w_BSE = weights_BSE.to(dtype)
        w13_BSDF2 = torch.einsum("bse,edf->bsdf", w_BSE, w13_EDF2.to(dtype))
        w2_BSFD = torch.einsum("bse,efd->bsfd", w_BSE, w2_EFD.to(dtype))
    return w13_BSDF2, w2_BSFD


def check_merging_moe(
    capacity_factor: float | None,
    iterations: int,
    debug_uniform_routing: bool,
    capacity_name: str = "capacity_factor",
) -> None:
    """MoE arguments that mean nothing (or something else) when experts are merged, refused
    (``capacity_name``: the capacity argument checked, ``capacity_factor`` or
    ``eval_capacity_factor``)."""
    if capacity_factor is not None:
        raise ValueError(
            f"{capacity_name} must be None with router 'lory' (experts are merged, no token is "
            f"dispatched or dropped), got {capacity_factor!r}"
        )
    if iterations != 1:
        raise ValueError(
            f"iterations must be 1 with router 'lory' (no Chain-of-Experts), got {iterations!r}"
        )
    if debug_uniform_routing:
        raise ValueError("debug_uniform_routing cannot be combined with router 'lory'")
