"""What the expert-pruning methods share: each block's :class:`LayerChange` of a pruned model.
(A helper module of the package: its name starts with ``_``, so discovery skips it.)"""

from __future__ import annotations

from moelab.compress.methods.base import LayerChange, module_bytes, module_params
from moelab.compress.prune import moe_blocks
from moelab.model import TransformerLM


def pruning_changes(
    model: TransformerLM, pruned: TransformerLM, *, nonzero: bool = False
) -> list[LayerChange]:
    """Per MoE block, experts, parameters (``nonzero``: only the nonzero ones of the pruned
    layer, for methods that zero weights in place) and bytes of the layer before and after."""
    after = moe_blocks(pruned)
    return [
        LayerChange(
            block=i,
            experts_before=moe.num_experts,
            experts_after=after[i].num_experts,
            params_before=module_params(moe),
            params_after=module_params(after[i], nonzero=nonzero),
            bytes_before=module_bytes(moe),
            bytes_after=module_bytes(after[i]),
        )
        for i, moe in moe_blocks(model).items()
    ]
