"""What the expert-pruning methods share: each block's :class:`LayerChange`, a ranking, and
each MoE layer's inputs on the calibration tokens.
(A helper module of the package: its name starts with ``_``, so discovery skips it.)"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from moelab.compress.prune import calibration_forwards, moe_blocks
from moelab.layers.base import RoutingContext
from moelab.model import TransformerLM


def ranked_keep(score_E: torch.Tensor, keep: int) -> torch.Tensor:
    """The ``keep`` experts of highest ``score_E``, ascending ids (ties: the lower id)."""
    order = torch.argsort(-score_E, stable=True)
    return order[:keep].sort().values


@torch.no_grad()
def layer_inputs(model: TransformerLM, batches: list[torch.Tensor]) -> dict[int, list[LayerCall]]:
    """What each MoE layer receives on ``batches`` (a no-grad eval forward of the unchanged
    model): per block, one :class:`LayerCall` per batch, to run the layer (or a pruned copy of
    it) again on the same inputs."""
    calls: dict[int, list[LayerCall]] = {i: [] for i in moe_blocks(model)}

    def hook(block: int):
        def record(module, args, kwargs):
            x = kwargs.get("x", args[0] if args else None)
            calls[block].append(
                LayerCall(x.detach(), kwargs.get("token_mask"), kwargs.get("context"))
            )

        return record

    handles = [
        moe.register_forward_pre_hook(hook(i), with_kwargs=True)
        for i, moe in moe_blocks(model).items()
    ]
    try:
        calibration_forwards(model, batches)
    finally:
        for h in handles:
            h.remove()
    return calls


@dataclass(frozen=True)
class LayerCall:
    """One forward's inputs of a MoE layer."""

    x: torch.Tensor
    token_mask: torch.Tensor | None
    context: RoutingContext | None

    def run(self, layer: torch.nn.Module) -> torch.Tensor:
        return layer(self.x, token_mask=self.token_mask, context=self.context)
