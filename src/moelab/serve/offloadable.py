"""Which MoE layers of a model can be offloaded, or, in one line, why the model cannot be.

Checked before any weight is read or any token decoded (``moelab generate --expert-memory``,
``moelab bench offload``, :func:`moelab.serve.offload.offload_model`).
"""

from __future__ import annotations

from moelab.layers import MoE
from moelab.layers.base import RoutedLayer
from moelab.layers.dispatch import LocalDispatcher
from moelab.layers.routers import require
from moelab.model import TransformerLM

__all__ = ["check_offloadable"]


def check_offloadable(model: TransformerLM) -> list[tuple[int, MoE]]:
    """``(block, layer)`` of every MoE layer; a one-line ValueError when the model cannot be
    offloaded: no MoE layer, a layer that gathers rows instead of running experts (PEER, PKM),
    a router that is not causal at inference, experts merged per segment, expert parallelism,
    or a device other than the CPU."""
    found = []
    for i, block in enumerate(model.blocks):
        ffn = block.ffn
        if isinstance(ffn, MoE):
            slot = model.cfg.ffn_for(i)
            try:
                require(slot.router, "causal_at_inference", slot.router_kwargs())
            except ValueError as err:
                raise ValueError(f"--expert-memory: {err}") from None
            if ffn.merges_experts:
                raise ValueError(
                    f"--expert-memory: router {ffn.router_name!r} merges every expert's weights "
                    "per segment, so every expert is needed at every token: nothing to offload"
                )
            if not isinstance(ffn.dispatcher, LocalDispatcher):
                raise ValueError("--expert-memory: experts are spread over processes already")
            found.append((i, ffn))
        elif isinstance(ffn, RoutedLayer):  # PEER, PKM
            raise ValueError(
                f"--expert-memory: block {i} is {type(ffn).__name__}, which needs no expert "
                "offloading: it gathers single rows of a product-key table per token, not whole "
                "experts, so only the rows it reads are touched"
            )
    if not found:
        raise ValueError("--expert-memory: the model has no MoE layer (no experts to offload)")
    if model.tok_emb.weight.device.type not in ("cpu", "meta"):
        raise ValueError("--expert-memory: offloaded serving runs on CPU models for now")
    return found
