"""What the expert-merging methods share: each block's :class:`LayerChange` of a merged model.
(A helper module of the package: it registers no method.)"""

from __future__ import annotations

from moelab.compress.merging import moe_blocks
from moelab.compress.methods.base import LayerChange, module_bytes, module_params
from moelab.model import TransformerLM


def merge_changes(model: TransformerLM, merged: TransformerLM) -> list[LayerChange]:
    """Per MoE block: experts (weight slots after), parameters and bytes before and after."""
    after = moe_blocks(merged)
    return [
        LayerChange(
            block=i,
            experts_before=moe.experts.num_experts,
            experts_after=after[i].experts.num_experts,
            params_before=module_params(moe),
            params_after=module_params(after[i]),
            bytes_before=module_bytes(moe),
            bytes_after=module_bytes(after[i]),
        )
        for i, moe in moe_blocks(model).items()
    ]
