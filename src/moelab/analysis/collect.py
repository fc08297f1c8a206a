"""One evaluation pass that records every routed layer's per-token decisions.

The layers report their own decisions through ``routing_observer`` (``moelab.layers.base``); this
module only stores them with global token positions, so analyses never recompute routing. The pass
runs under ``model.eval()`` and ``torch.no_grad()``, which leaves the layers' training statistics
and aux losses untouched: those describe training batches only (the λ controller reads them).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from moelab.layers.base import RoutedLayer, RoutingDecision, routed_layers

# Layers with more experts than this keep only aggregates (z', loads, distinct per batch) by
# default: PEER/PKM retrieve hundreds of experts per token (16 bytes each per assignment), and
# their per-expert tables (domains, top tokens) would not be readable anyway.
MAX_FLAT_EXPERTS = 1024


@dataclass
class LayerTrace:
    """Everything one routed layer decided over the pass.

    ``token_idx_N`` indexes the pass's flat token arrays (:attr:`RoutingTrace.token_ids_T`);
    flat arrays are None when the layer kept aggregates only (``store_flat=False``).
    """

    name: str
    kind: str  # "moe-topk", "moe-relu", "peer", "pkm", or the class name
    num_experts: int
    load_E: np.ndarray  # assignments per expert (int64)
    z_prime_E: np.ndarray  # Σ gate weight per expert (float64), PEER's z'
    distinct_per_batch: list[int] = field(default_factory=list)
    token_idx_N: np.ndarray | None = None
    expert_idx_N: np.ndarray | None = None
    weight_N: np.ndarray | None = None
    active_T: np.ndarray | None = None  # experts per token (int32), always kept

    @property
    def has_flat(self) -> bool:
        return self.token_idx_N is not None


@dataclass
class RoutingTrace:
    """Per-token routing of every routed layer over a sequence of evaluation batches."""

    token_ids_T: np.ndarray  # input token ids, flattened over batches
    domain_T: np.ndarray  # domain index of each position (iter_eval_batches' domain_ids)
    loss_T: np.ndarray  # per-position LM loss (nats) of the same pass
    layers: dict[str, LayerTrace]
    domains: list[str]

    @property
    def num_tokens(self) -> int:
        return int(self.token_ids_T.size)


def layer_kind(layer: nn.Module) -> str:
    """A short label of a routed layer's method (``moe-topk``, ``moe-relu``, ``peer``, ``pkm``)."""
    cls = type(layer).__name__.lower()
    if cls == "moe":
        return f"moe-{getattr(layer, 'router_name', 'topk')}"
    return cls


def _layer_names(model: nn.Module) -> dict[int, str]:
    """``id(layer) → name``; a layer inside ``blocks.<i>`` is named by its block index ``"i"``
    (the key ``metrics.jsonl`` uses for per-layer statistics)."""
    names: dict[int, str] = {}
    for name, module in model.named_modules():
        if isinstance(module, RoutedLayer):
            m = re.search(r"(?:^|\.)blocks\.(\d+)\.", name)
            names[id(module)] = m.group(1) if m else name
    return names


class _Recorder:
    """The observer: appends each decision to per-layer lists with a running token offset."""

    def __init__(self, layers: list[RoutedLayer], names: dict[int, str], store_flat: bool | None):
        self.offset = 0
        self.batch_tokens = 0
        self.parts: dict[str, dict[str, list[np.ndarray]]] = {}
        self.traces: dict[str, LayerTrace] = {}
        for layer in layers:
            E = int(layer.num_experts)
            flat = E <= MAX_FLAT_EXPERTS if store_flat is None else store_flat
            name = names[id(layer)]
            self.traces[name] = LayerTrace(
                name=name,
                kind=layer_kind(layer),
                num_experts=E,
                load_E=np.zeros(E, np.int64),
                z_prime_E=np.zeros(E, np.float64),
            )
            self.parts[name] = {"tok": [], "exp": [], "w": [], "act": []} if flat else {"act": []}
        self.names = names

    def __call__(self, layer: RoutedLayer, decision: RoutingDecision, x_TD: torch.Tensor) -> None:
        name = self.names[id(layer)]
        tr, parts = self.traces[name], self.parts[name]
        tok = decision.token_idx_N.detach().cpu().numpy().astype(np.int64)
        exp = decision.expert_idx_N.detach().cpu().numpy().astype(np.int64)
        w = decision.weight_N.detach().float().cpu().numpy()
        T = int(decision.num_tokens)
        tr.load_E += np.bincount(exp, minlength=tr.num_experts)
        tr.z_prime_E += np.bincount(exp, weights=w.astype(np.float64), minlength=tr.num_experts)
        tr.distinct_per_batch.append(int(np.unique(exp).size))
        parts["act"].append(np.bincount(tok, minlength=T).astype(np.int32))
        if "tok" in parts:
            parts["tok"].append((tok + self.offset).astype(np.int64))
            parts["exp"].append(exp.astype(np.int32))
            parts["w"].append(w.astype(np.float32))

    def finish(self) -> dict[str, LayerTrace]:
        for name, tr in self.traces.items():
            parts = self.parts[name]
            cat = np.concatenate
            tr.active_T = cat(parts["act"]) if parts["act"] else np.zeros(0, np.int32)
            if "tok" in parts:
                tr.token_idx_N = cat(parts["tok"]) if parts["tok"] else np.zeros(0, np.int64)
                tr.expert_idx_N = cat(parts["exp"]) if parts["exp"] else np.zeros(0, np.int32)
                tr.weight_N = cat(parts["w"]) if parts["w"] else np.zeros(0, np.float32)
        return self.traces


@torch.no_grad()
def collect_routing(
    model: nn.Module,
    batches: Iterable[dict[str, torch.Tensor]],
    domains: list[str] | None = None,
    store_flat: bool | None = None,
    device: torch.device | str | None = None,
) -> RoutingTrace:
    """Run ``model`` over ``batches`` (dicts with ``input_ids``, ``targets``, ``domain_ids`` as
    :func:`moelab.data.iter_eval_batches` yields) and record every routed layer's decisions.

    The model is put in eval mode for the pass and restored afterwards; observers already set on
    the layers are restored too. ``store_flat`` forces (True) or forbids (False) keeping the flat
    per-assignment arrays (default: only for layers with at most ``MAX_FLAT_EXPERTS`` experts).
    A model with no routed layer gives a trace with no layers (and still the per-token loss).
    """
    layers = routed_layers(model)
    names = _layer_names(model)
    rec = _Recorder(layers, names, store_flat)
    saved = [(layer, layer.routing_observer) for layer in layers]
    was_training = model.training
    if device is None:
        p = next(model.parameters(), None)
        device = p.device if p is not None else "cpu"
    ids_parts, dom_parts, loss_parts = [], [], []
    try:
        model.eval()
        for layer in layers:
            layer.routing_observer = rec
        for batch in batches:
            input_ids = batch["input_ids"].to(device)
            logits = model(input_ids)
            loss = torch.nn.functional.cross_entropy(
                logits.float().reshape(-1, logits.shape[-1]),
                batch["targets"].to(device).reshape(-1),
                reduction="none",
            )
            n = input_ids.numel()
            ids_parts.append(input_ids.reshape(-1).cpu().numpy().astype(np.int64))
            dom = batch.get("domain_ids")
            dom_parts.append(
                np.zeros(n, np.int64)
                if dom is None
                else dom.reshape(-1).cpu().numpy().astype(np.int64)
            )
            loss_parts.append(loss.cpu().numpy().astype(np.float32))
            rec.offset += n
    finally:
        for layer, obs in saved:
            layer.routing_observer = obs
        model.train(was_training)
    cat = np.concatenate
    return RoutingTrace(
        token_ids_T=cat(ids_parts) if ids_parts else np.zeros(0, np.int64),
        domain_T=cat(dom_parts) if dom_parts else np.zeros(0, np.int64),
        loss_T=cat(loss_parts) if loss_parts else np.zeros(0, np.float32),
        layers=rec.finish(),
        domains=list(domains) if domains else ["all"],
    )
