"""``--method reconstruction``: per layer, keep the experts whose pruned layer reproduces the
layer's output best on calibration tokens.

Lu et al., "Not All Experts are Equal: Efficient Expert Pruning and Skipping for
Mixture-of-Experts Large Language Models" (ACL 2024, arXiv 2402.14800), §3.1: for each MoE layer,
choose the set S of ``keep`` experts minimising the reconstruction loss
``‖F(x) − F'(x, S)‖_F`` over the calibration tokens, where ``F`` is the layer and ``F'`` the same
layer with only the experts in S (its router choosing among them, as the pruned model will).
Every layer is scored on its inputs in the unchanged model (layer-wise, as the paper's
enumeration does). Search: exhaustive over all ``C(E, keep)`` sets when that is at most
``--max-combinations`` (default 5000, the paper's enumeration), otherwise greedy removal (drop,
one at a time, the expert whose removal raises the loss least: ``O(E²)`` evaluations); the
details say which, per layer. ``F'`` is the layer built by the router's own pruning
(:meth:`~moelab.layers.routers.Router.pruned_state`): a softmax router normalises over the kept
experts, as Mixtral's (the paper's) top-2 gate renormalises over the two it picks.
"""

from __future__ import annotations

import argparse
import itertools
import math
from typing import Any

import torch

from moelab.compress.methods._pruning import LayerCall, layer_inputs
from moelab.compress.methods.base import (
    Calibration,
    CompressMethod,
    CompressOutcome,
    layer_changes,
    register_method,
)
from moelab.compress.prune import (
    keep_for_ratio,
    moe_blocks,
    prune_to,
    pruned_layer,
    sliced_layer_state,
)
from moelab.layers.moe import MoE
from moelab.model import TransformerLM


@torch.no_grad()
def reconstruction_loss(
    layer: MoE,
    template: MoE,
    calls: list[LayerCall],
    kept_K: torch.Tensor,
    targets: list[torch.Tensor] | None = None,
) -> float:
    """``‖F(x) − F'(x, kept)‖_F²`` summed over ``calls``: ``template`` (the layer built for
    ``len(kept_K)`` experts, :func:`~moelab.compress.prune.pruned_layer`) takes the kept
    experts' state and runs on the same inputs; ``targets``: ``F(x)`` of each call, computed
    once by the caller (default: run ``layer`` again)."""
    template.eval().load_state_dict(sliced_layer_state(layer, kept_K))
    if targets is None:
        targets = [call.run(layer) for call in calls]
    total = 0.0
    for call, target in zip(calls, targets, strict=True):
        total += float((target.double() - call.run(template).double()).square().sum())
    return total


def search(
    loss, num_experts: int, keep: int, max_combinations: int
) -> tuple[torch.Tensor, str, float]:
    """The kept set of lowest ``loss(kept_K)``: exhaustive when ``C(E, keep)`` sets are at most
    ``max_combinations`` (ties: the first set in lexicographic order), else greedy removal.
    Returns the set (ascending), the search used and its loss."""
    if math.comb(num_experts, keep) <= max_combinations:
        best, best_loss = None, math.inf
        for kept in itertools.combinations(range(num_experts), keep):
            value = loss(torch.tensor(kept))
            if value < best_loss:
                best, best_loss = kept, value
        return torch.tensor(best), "exhaustive", best_loss
    kept_list = list(range(num_experts))
    value = math.inf
    while len(kept_list) > keep:
        trials = [
            (loss(torch.tensor(kept_list[:j] + kept_list[j + 1 :])), j)
            for j in range(len(kept_list))
        ]
        value, j = min(trials)
        del kept_list[j]
    return torch.tensor(kept_list), "greedy", value


@register_method
class Reconstruction(CompressMethod):
    name = "reconstruction"
    summary = (
        "keep, per layer, the experts whose pruned layer best reconstructs the layer output on "
        "calibration tokens (Lu et al. 2024, exhaustive or greedy)"
    )
    capability = "prunable"

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        parser.add_argument(
            "--max-combinations",
            type=int,
            default=5000,
            help="reconstruction: exhaustive search up to this many expert sets per layer, "
            "greedy removal above (default 5000)",
        )

    def __init__(self, ratio: float | None, options: dict[str, Any]) -> None:
        super().__init__(ratio, options)
        self.require_ratio()
        cap = self.options["max_combinations"]
        if isinstance(cap, bool) or not isinstance(cap, int) or cap < 1:
            raise ValueError(f"--max-combinations: must be a positive integer, got {cap!r}")
        self.max_combinations = cap

    def check(self, model: TransformerLM) -> None:
        keep_for_ratio(model, self.require_ratio())

    @torch.no_grad()
    def apply(self, model: TransformerLM, calib: Calibration) -> CompressOutcome:
        keep = keep_for_ratio(model, self.require_ratio())
        blocks = moe_blocks(model)
        calls = layer_inputs(model, calib.batches)
        templates: dict[tuple[int, int], MoE] = {}  # (block, experts) → a layer of that size
        kept, searches, losses = {}, {}, {}
        was_training = model.training
        model.eval()
        try:
            for i, layer in blocks.items():
                targets = [call.run(layer) for call in calls[i]]  # F(x), once per layer

                def loss(
                    kept_K: torch.Tensor, i: int = i, layer: MoE = layer, targets=targets
                ) -> float:
                    key = (i, len(kept_K))
                    if key not in templates:
                        templates[key] = pruned_layer(model, i, len(kept_K))
                    return reconstruction_loss(layer, templates[key], calls[i], kept_K, targets)

                kept[i], searches[i], losses[i] = search(
                    loss, layer.num_experts, keep, self.max_combinations
                )
        finally:
            model.train(was_training)
        pruned = prune_to(model, kept)
        details = {
            "keep": keep,
            "search": {str(i): s for i, s in searches.items()},
            "combinations": math.comb(next(iter(blocks.values())).num_experts, keep),
            "reconstruction_loss": {str(i): v for i, v in losses.items()},
            "kept_experts": {str(i): ids.tolist() for i, ids in kept.items()},
        }
        return CompressOutcome(pruned, layer_changes(model, pruned), details)
