"""``--method mc_smoe``: MC-SMoE's expert merging (Li et al., ICLR 2024, "Merge, Then Compress:
Demystify Efficient SMoE with Hints from Its Routing Policy", arXiv 2310.01334).

Per MoE block, the ``S = round(ratio·E)`` most-routed experts on the calibration tokens lead the
groups; every other expert joins the one whose router-logit column is most similar; members are
permutation-aligned to their leader and averaged with their routing frequencies
(:mod:`moelab.compress.mc_smoe_groups`). The router is kept whole and each expert routes to its
group's slot (:mod:`moelab.compress.merging`). The paper's low-rank "compress" step is not done.
"""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from moelab.compress.mc_smoe_groups import dominant_groups, merge_groups
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

if TYPE_CHECKING:
    from moelab.model import TransformerLM


@register_method
class MCSMoE(CompressMethod):
    name = "mc_smoe"
    summary = (
        "merge each layer's experts into the most-routed ones, grouped by router-logit "
        "similarity, neurons aligned, frequency-weighted (MC-SMoE, Li et al. ICLR 2024)"
    )
    capability = "mergeable"

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        parser.add_argument(
            "--no-align",
            dest="align",
            action="store_false",
            help="mc_smoe: average the experts without aligning their hidden units first",
        )
        parser.add_argument(
            "--logit-tokens",
            type=int,
            default=4096,
            help="mc_smoe: calibration tokens whose router logits compare the experts (4096)",
        )

    def slots(self, model: TransformerLM) -> int:
        check_mergeable(model)
        tokens = self.options.get("logit_tokens", 4096)
        if not isinstance(tokens, int) or isinstance(tokens, bool) or tokens < 1:
            raise ValueError(f"--logit-tokens: must be an integer >= 1, got {tokens!r}")
        return slots_for_ratio(
            self.require_ratio(), next(iter(moe_blocks(model).values())).num_experts
        )

    def check(self, model: TransformerLM) -> None:
        self.slots(model)

    def apply(self, model: TransformerLM, calib: Calibration) -> CompressOutcome:
        slots = self.slots(model)
        align = bool(self.options.get("align", True))
        profiles = routing_profiles(model, calib.batches, self.options.get("logit_tokens", 4096))
        groups, weights = {}, {}
        for i, moe in moe_blocks(model).items():
            prof = profiles[i]
            groups[i] = dominant_groups(prof.counts_E, prof.logits, slots)
            w13, w2 = moe.experts.w13_EDF2.detach(), moe.experts.w2_EFD.detach()
            weights[i] = merge_groups(w13, w2, groups[i], prof.counts_E.to(w13.device), align)
        merged = merged_model(model, groups, weights)
        details = {
            "expert_slots": slots,
            "align": align,
            "groups": {str(i): g for i, g in groups.items()},
            "usage": {str(i): p.counts_E.tolist() for i, p in profiles.items()},
        }
        return CompressOutcome(merged, layer_changes(model, merged, stored_experts), details)
