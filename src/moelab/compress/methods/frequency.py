"""``--method frequency``: keep each MoE layer's most-used experts (``moelab prune``'s criterion).

Usage counts are the tokens each router sends to each expert on the calibration batches
(:func:`~moelab.compress.prune.expert_usage`); every MoE block keeps its own most-used experts
(ties: the lower id). Frequency is the simplest expert-pruning criterion of the literature
(Muzio et al. 2024, "SEER-MoE: Sparse Expert Efficiency through Regularization for
Mixture-of-Experts", arXiv 2404.05089, prune by activation counts as here). How many experts
stay: ``--keep N`` routed experts per layer, or ``--ratio`` (the fraction of expert parameters
kept, rounded up to whole coarse experts). Exact where the router says so (``prunes_exactly``)
for experts no token chose.
"""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, Any

from moelab.compress.methods.base import (
    Calibration,
    CompressMethod,
    CompressOutcome,
    layer_changes,
    register_method,
)
from moelab.compress.prune import check_prunable, expert_usage, keep_for_ratio, prune_experts

if TYPE_CHECKING:
    from moelab.model import TransformerLM


@register_method
class Frequency(CompressMethod):
    name = "frequency"
    summary = (
        "keep each MoE layer's most-used experts on the calibration tokens (usage counts, as "
        "SEER-MoE, Muzio et al. 2024; moelab prune)"
    )
    capability = "prunable"

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        parser.add_argument(
            "--keep",
            type=int,
            default=None,
            help="frequency: routed experts kept per MoE layer (instead of --ratio)",
        )

    def __init__(self, ratio: float | None, options: dict[str, Any]) -> None:
        super().__init__(ratio, options)
        self.keep_option: int | None = self.options.get("keep")
        if (self.keep_option is None) == (ratio is None):
            raise ValueError("--keep: method 'frequency' takes either --keep N or --ratio R")

    def keep(self, model: TransformerLM) -> int:
        if self.keep_option is None:
            return keep_for_ratio(model, self.require_ratio())
        check_prunable(model, self.keep_option)
        return self.keep_option

    def check(self, model: TransformerLM) -> None:
        self.keep(model)

    def apply(self, model: TransformerLM, calib: Calibration) -> CompressOutcome:
        keep = self.keep(model)
        usage = expert_usage(model, calib.batches)
        pruned, kept = prune_experts(model, keep, usage)
        share = {
            str(i): float(usage[i][ids].sum()) / max(float(usage[i].sum()), 1.0)
            for i, ids in kept.items()
        }
        details = {
            "keep": keep,
            "kept_experts": {str(i): ids for i, ids in kept.items()},
            "usage": {str(i): u.tolist() for i, u in usage.items()},
            "kept_share_of_routings": share,
        }
        return CompressOutcome(pruned, layer_changes(model, pruned), details)
