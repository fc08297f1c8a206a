"""``--method sub_moe``: Sub-MoE's subspace expert merging (Li et al. 2025, "Sub-MoE: Efficient
Mixture-of-Expert LLMs Compression via Subspace Expert Merging", arXiv 2506.23266).

Per MoE block, experts are clustered into ``S = round(ratio·E)`` groups by the similarity of
their outputs on calibration tokens; each group's weight matrices are decomposed jointly (shared
``U``, expert-specific ``V``), the ``V`` parts averaged with routing frequencies and the merged
expert rebuilt in the shared basis (:mod:`moelab.compress.subspace`, which says what is
simplified). The router is kept whole and each expert routes to its group's slot
(:mod:`moelab.compress.merging`).
"""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from moelab.compress.merging import (
    check_mergeable,
    merged_model,
    moe_blocks,
    routing_profiles,
    slots_for_ratio,
)
from moelab.compress.methods.base import (
    Calibration,
    CompressMethod,
    CompressOutcome,
    layer_changes,
    register_method,
    stored_experts,
)
from moelab.compress.subspace import cluster_by_similarity, expert_output_similarity, merge_groups

if TYPE_CHECKING:
    from moelab.model import TransformerLM


def _positive_int(option: str, value: object, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{option}: must be an integer >= 1, got {value!r}")


@register_method
class SubMoE(CompressMethod):
    name = "sub_moe"
    summary = (
        "cluster each layer's experts by output similarity and merge each cluster in a shared "
        "SVD subspace (Sub-MoE, Li et al. 2025)"
    )
    capability = "mergeable"

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        parser.add_argument(
            "--subspace-rank",
            type=int,
            default=None,
            help="sub_moe: shared directions kept per merged matrix (default: min(out, in))",
        )
        parser.add_argument(
            "--subspace-align",
            action="store_true",
            help="sub_moe: align the experts' hidden units first (as mc_smoe; the paper does not)",
        )
        parser.add_argument(
            "--output-tokens",
            type=int,
            default=512,
            help="sub_moe: calibration tokens whose expert outputs cluster the experts (512)",
        )

    def slots(self, model: TransformerLM) -> int:
        check_mergeable(model)
        _positive_int("--subspace-rank", self.options.get("subspace_rank"), allow_none=True)
        _positive_int("--output-tokens", self.options.get("output_tokens", 512))
        return slots_for_ratio(
            self.require_ratio(), next(iter(moe_blocks(model).values())).num_experts
        )

    def check(self, model: TransformerLM) -> None:
        self.slots(model)

    def apply(self, model: TransformerLM, calib: Calibration) -> CompressOutcome:
        slots = self.slots(model)
        rank = self.options.get("subspace_rank")
        align = bool(self.options.get("subspace_align", False))
        profiles = routing_profiles(model, calib.batches, self.options.get("output_tokens", 512))
        groups, weights, links = {}, {}, {}
        for i, moe in moe_blocks(model).items():
            prof = profiles[i]
            x = prof.inputs.to(moe.experts.w2_EFD.device)
            sim = expert_output_similarity(moe.experts, x).cpu()
            groups[i] = cluster_by_similarity(sim, slots, prof.counts_E)
            links[str(i)] = [round(float(sim[g][:, g].mean()), 4) for g in groups[i]]
            w13, w2 = moe.experts.w13_EDF2.detach(), moe.experts.w2_EFD.detach()
            counts = prof.counts_E.to(w13.device)
            weights[i] = merge_groups(w13, w2, groups[i], counts, rank, align)
        merged = merged_model(model, groups, weights)
        details = {
            "expert_slots": slots,
            "subspace_rank": rank,
            "align": align,
            "groups": {str(i): g for i, g in groups.items()},
            "group_output_similarity": links,
            "usage": {str(i): p.counts_E.tolist() for i, p in profiles.items()},
        }
        return CompressOutcome(merged, layer_changes(model, merged, stored_experts), details)
