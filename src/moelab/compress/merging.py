"""Expert merging: several experts of an MoE block become one set of weights that they share.

The model keeps its router: routing, the router's state, losses and statistics stay over all
``E`` experts, and each expert is mapped to the weight slot of its group (MoE's ``expert_slots``
and ``expert_slot`` buffer, :class:`~moelab.layers.MoE`). This is what MC-SMoE does (Li et al.,
ICLR 2024, §3: "the router is kept and the experts of a group route to their merged expert"),
and it needs no approximation of the router: a softmax or ReLU gate over a merged group cannot be
written as one linear router row. A TopK token that picks two experts of one group runs the
merged expert twice, once per gate (the same as once with the gates added); a ReLU token's gates
likewise add up. The ReLU sparsity target ``1 − k/E`` is unchanged (same router, same ``E``
outputs), so the ReMoE λ carries over as it is.

This module holds what both merging methods share: the calibration pass
(:func:`routing_profiles`), the frequency-weighted average (:func:`weighted_average`) and the
build of the merged model from per-block groups (:func:`merged_model`). MC-SMoE's grouping and
Sub-MoE's subspace merge are in :mod:`moelab.compress.mc_smoe_groups` and
:mod:`moelab.compress.subspace`.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from moelab.compress.prune import build_model, calibration_forwards, moe_blocks
from moelab.layers.routers import require
from moelab.model import ModelConfig, TransformerLM

__all__ = [
    "RoutingProfile",
    "check_mergeable",
    "merged_model",
    "moe_blocks",
    "routing_profiles",
    "slots_for_ratio",
    "weighted_average",
]

Groups = list[list[int]]  # per block: each slot's experts (the first one: its dominant expert)


def check_mergeable(model: TransformerLM) -> None:
    """Refuse, naming the field, before any work."""
    if not moe_blocks(model):
        raise ValueError("model.ffn.kind: no MoE layer to merge (must be 'moe')")
    ffn = model.cfg.ffn
    try:
        require(ffn.router, "mergeable", ffn.router_kwargs())
    except ValueError as err:
        raise ValueError(f"model.ffn.router: {err}") from None
    if ffn.expert_slots is not None:
        raise ValueError(
            f"model.ffn.expert_slots: the experts are merged already ({ffn.expert_slots} slots)"
        )


def slots_for_ratio(ratio: float, routed_experts: int) -> int:
    """Weight slots that keep the fraction ``ratio`` of expert parameters: ``round(ratio·E)``,
    from 1 to ``E − 1`` (else a one-line error naming ``--ratio``)."""
    slots = round(ratio * routed_experts)
    if not 1 <= slots < routed_experts:
        raise ValueError(
            f"--ratio: {ratio} keeps {slots} of {routed_experts} experts' weights; it must keep "
            f"from 1 to {routed_experts - 1}, i.e. a ratio in [{0.5 / routed_experts:.3g}, "
            f"{(routed_experts - 0.5) / routed_experts:.3g})"
        )
    return slots


@dataclass
class RoutingProfile:
    """What one MoE block did on the calibration tokens."""

    counts_E: Tensor  # long [E]: tokens routed to each expert (the router's decisions)
    logits_NE: list[Tensor] = field(default_factory=list)  # router logits of sampled tokens
    inputs_ND: list[Tensor] = field(default_factory=list)  # the block's inputs, same tokens

    @property
    def logits(self) -> Tensor:
        return torch.cat(self.logits_NE)

    @property
    def inputs(self) -> Tensor:
        return torch.cat(self.inputs_ND)


@torch.no_grad()
def routing_profiles(
    model: TransformerLM, batches: Iterable[Tensor], max_tokens: int = 4096
) -> dict[int, RoutingProfile]:
    """Per MoE block: expert counts over all ``batches`` (input ids), and the router logits and
    inputs of the first ``max_tokens`` tokens (evaluation mode; nothing learnt or recorded)."""
    blocks = moe_blocks(model)
    profiles = {
        i: RoutingProfile(torch.zeros(m.num_experts, dtype=torch.long)) for i, m in blocks.items()
    }
    handles = []

    def hook(block: int):
        def read(router, args, out) -> None:
            prof, e = profiles[block], blocks[block].num_experts
            prof.counts_E += out.decision.tokens_per_expert_E[:e].cpu()
            room = max_tokens - sum(len(t) for t in prof.logits_NE)
            if room > 0:
                prof.logits_NE.append(out.logits_TE[:room, :e].float().cpu())
                prof.inputs_ND.append(args[0][:room].float().cpu())

        return read

    try:
        for i, moe in blocks.items():
            handles.append(moe.router.register_forward_hook(hook(i)))
        calibration_forwards(model, batches)
    finally:
        for h in handles:
            h.remove()
    return profiles


def weighted_average(tensors: Tensor, weights: Tensor) -> Tensor:
    """``Σ_i w_i·t_i / Σ_i w_i`` over the first dimension (MC-SMoE's frequency-weighted merge,
    §3.2); equal weights where they sum to 0 (a group no calibration token chose)."""
    w = weights.to(torch.float64)
    if not w.sum() > 0:
        w = torch.ones_like(w)
    w = (w / w.sum()).to(tensors.dtype)
    return torch.tensordot(w, tensors, dims=1)


@torch.no_grad()
def merged_model(
    model: TransformerLM,
    groups: dict[int, Groups],
    weights: dict[int, tuple[Tensor, Tensor]],
) -> TransformerLM:
    """A copy of ``model`` whose MoE block ``i`` holds the merged weights ``weights[i]``
    (``w13 [S, D, 2F]``, ``w2 [S, F, D]``), slot ``s`` shared by the experts ``groups[i][s]``;
    ``model.cfg`` with ``expert_slots = S`` rebuilds it (the state dict loads strictly)."""
    blocks = moe_blocks(model)
    slots = {len(g) for g in groups.values()}
    if set(groups) != set(blocks) or len(slots) != 1:
        raise ValueError("groups: one list of the same number of groups per MoE block")
    ffn = model.cfg.to_dict()["ffn"] | {"expert_slots": slots.pop()}
    merged = build_model(ModelConfig.from_dict(model.cfg.to_dict() | {"ffn": ffn}))
    state = model.state_dict()
    for i, moe in blocks.items():
        slot_E = torch.full((moe.num_experts,), -1, dtype=torch.long)
        for s, members in enumerate(groups[i]):
            slot_E[members] = s
        if (slot_E < 0).any():
            raise ValueError(
                f"groups: block {i} leaves experts {(slot_E < 0).nonzero().flatten().tolist()} out"
            )
        w13, w2 = weights[i]
        prefix = f"blocks.{i}.ffn."
        state[prefix + "experts.w13_EDF2"] = w13.to(moe.experts.w13_EDF2.dtype)
        state[prefix + "experts.w2_EFD"] = w2.to(moe.experts.w2_EFD.dtype)
        state[prefix + "expert_slot"] = slot_E.to(moe.experts.w2_EFD.device)
    merged.load_state_dict(state, strict=True)
    return merged.to(next(model.parameters()).device).train(model.training)
