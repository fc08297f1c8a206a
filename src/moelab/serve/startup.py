"""Start-up without the experts in memory: build the model on the meta device, materialise the rest.

``TransformerLM(cfg)`` on the CPU allocates (and randomly initialises) every expert before
offloading drops them, so start-up memory and time were the whole model's. Built under
``torch.device("meta")`` instead, no tensor has storage; once offloading has replaced the experts'
parameters by empty ones, :func:`materialize` gives the remaining (resident) tensors CPU storage
with ``Module.to_empty`` and the caller fills them from the checkpoint file. What ``to_empty``
cannot know is restored here:

* tied parameters (the tied LM head): ``to_empty`` converts each module's parameter separately,
  which would untie them, so every sharing site gets the first site's new parameter back;
* non-persistent buffers (not in the file; e.g. the hash router's zero gate, MoE++'s ``eta``):
  taken from a CPU twin of the router that owns them, built from the layer's config (routers are
  small); a non-persistent buffer anywhere else is refused by :func:`meta_buildable`, and the
  caller builds on the CPU as before;
* the RoPE tables, plain float32 attributes computed from the config.
"""

from __future__ import annotations

import torch
from torch import nn

from moelab.layers import MoE
from moelab.layers.routers import build_router
from moelab.model import TransformerLM
from moelab.model.transformer import rope_tables

__all__ = ["build_meta", "materialize", "meta_buildable"]


def build_meta(cfg) -> TransformerLM:
    """The model with no storage at all (every tensor on ``meta``), in eval mode."""
    with torch.device("meta"):
        return TransformerLM(cfg).eval()


def _non_persistent(model: nn.Module) -> list[tuple[str, nn.Module, str]]:
    return [
        (prefix, module, name)
        for prefix, module in model.named_modules()
        for name in module._non_persistent_buffers_set
        if module._buffers.get(name) is not None
    ]


def meta_buildable(model: TransformerLM) -> bool:
    """Whether :func:`materialize` can restore every tensor of ``model`` (see module doc)."""
    routers = {id(b.ffn.router) for b in model.blocks if isinstance(b.ffn, MoE)}
    return all(id(module) in routers for _, module, _ in _non_persistent(model))


@torch.no_grad()
def materialize(model: TransformerLM) -> None:
    """CPU storage (uninitialised) for every tensor of a meta-built ``model``; the caller loads
    the persistent ones from the file. Restores ties, non-persistent buffers and RoPE tables."""
    sites: dict[int, list[tuple[nn.Module, str]]] = {}
    for module in model.modules():
        for name, p in module._parameters.items():
            if p is not None:
                sites.setdefault(id(p), []).append((module, name))
    model.to_empty(device="cpu")
    for shared in sites.values():
        first = shared[0][0]._parameters[shared[0][1]]
        for module, name in shared[1:]:
            module._parameters[name] = first
    twins: dict[int, nn.Module] = {}
    for i, block in enumerate(model.blocks):
        if isinstance(block.ffn, MoE):
            slot = model.cfg.ffn_for(i)
            g = slot.granularity
            twins[id(block.ffn.router)] = build_router(
                slot.router,
                model.cfg.d_model,
                slot.num_experts * g,
                slot.top_k * g,
                1.0,
                **slot.router_kwargs(),
            )
    for prefix, module, name in _non_persistent(model):
        twin = twins.get(id(module))
        if twin is None:
            raise RuntimeError(f"{prefix}.{name}: a non-persistent buffer outside a router")
        module._buffers[name].copy_(twin._buffers[name])
    cfg = model.cfg
    model._rope_cos, model._rope_sin = (
        t.float() for t in rope_tables(cfg.head_dim, cfg.max_seq_len, cfg.rope_base)
    )
