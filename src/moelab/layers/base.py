"""Contracts shared by every routed FFN-slot layer (MoE, PEER, PKM).

Shape legend used in names and docstrings across ``moelab.layers``:

    T  tokens (all leading dims of ``x`` flattened)     D  model dim
    F  expert hidden dim                                E  experts
    K  top-k (experts per token for TopK routing)       N  flat (token, expert) assignments
    H  heads (PEER / PKM retrieval heads)               S  sub-keys per half (sqrt of #experts)
    C  candidates per head (k*k in product-key search)

A routed layer is a drop-in for an FFN: ``y = layer(x)`` with ``x: [..., D]``; an optional keyword
``token_mask`` (bool, same leading shape, True = real token) excludes padding from losses and
statistics. Everything else a layer produces is *recorded on the layer* rather than returned:

* ``layer.aux_losses``: raw (unweighted) aux losses of the last grad-enabled training forward,
  keyed by name; the layer's router (or the layer itself) defines them. Each is already normalised
  by the layer's own token count; :func:`collect_aux_losses` averages them over layers (the ``1/L``
  of the papers) and :func:`fixed_aux_loss` weights those with a fixed coefficient.
* ``layer.aux_coefficients``: the fixed coefficient of each loss this layer makes.
* ``layer.controlled_loss``: the name of the loss (if any) whose coefficient is adapted between
  steps, and ``layer.sparsity_target`` what the adaptation aims at (ReMoE's L1 and ``1 − k/E``):
  :class:`~moelab.layers.SparsityController` applies it with ``penalty(layers)``.
* ``layer.assignment_flops``: forward FLOPs of one computed (token, expert) assignment (one
  retrieved row for PEER / PKM), which ``last_stats.expert_flops`` multiplies by the assignments
  the layer really computed. The model's config sets it from its own FLOP accounting
  (:mod:`moelab.model.accounting`); a layer built alone counts it from its own expert weights.
* ``layer.last_stats``: a detached :class:`RoutingStats`, refreshed only by training forwards with
  grad enabled (or while ``layer.force_stats`` is set, which is how evaluation passes collect their
  own statistics) so that eval passes never pollute training counters.
* ``context``: an optional keyword :class:`RoutingContext` with what some routers need beyond
  ``x``: the token ids (Hash routing) and state passed from the previous routed layer (recurrent
  routers, gating residuals, momentum). :class:`~moelab.model.TransformerLM` makes one per forward.
* ``layer.routing_observer``: optional callback ``f(layer, decision, x_TD)`` called on every forward
  (training or not) - analysis uses it to see per-token routing without recomputing anything.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from typing import ClassVar

import torch
from torch import Tensor, nn


@dataclass(frozen=True)
class RoutingDecision:
    """What any router hands to any dispatcher: a flat list of (token, expert, weight) assignments.

    The flat form fits both fixed top-k routing and ReLU routing, where each token activates a
    variable number of experts. Assignments are in no particular order; dispatchers sort them.

    Attributes:
        token_idx_N: long ``[N]`` row of the flattened input each assignment reads.
        expert_idx_N: long ``[N]`` expert id in ``[0, E)``.
        weight_N: ``[N]`` gate weight multiplying the expert output (carries gradient).
        tokens_per_expert_E: long ``[E]`` histogram of ``expert_idx_N`` (after any dropping).
        num_tokens: T, rows of the flattened input (including padding rows).
        num_experts: E.
        dropped: number of assignments removed by a capacity limit (0 for dropless).
    """

    token_idx_N: Tensor
    expert_idx_N: Tensor
    weight_N: Tensor
    tokens_per_expert_E: Tensor
    num_tokens: int
    num_experts: int
    dropped: int | Tensor = 0

    @property
    def num_assignments(self) -> int:
        return int(self.token_idx_N.numel())


class RoutingContext:
    """What a routed layer may need beyond its input, for one forward of one layer.

    * ``token_ids``: long ``[..., ]`` with the leading shape of ``x`` (the model's input ids), for
      routers that route on the token itself (Hash routing). None when the caller has none.
    * state passed between layers: a layer reads what earlier layers passed with :meth:`get` and
      passes its own with :meth:`pass_on`; :meth:`next_layer` makes the context of the next layer.

    Read and written state are kept apart, so running a layer twice (activation checkpointing
    recomputes a block during backward) reads the same inputs and writes the same outputs.
    State not written by a layer flows on unchanged, past dense layers too.
    """

    def __init__(
        self, token_ids: Tensor | None = None, carried: dict[str, Tensor] | None = None
    ) -> None:
        self.token_ids = token_ids
        self._carried = dict(carried or {})
        self._passed: dict[str, Tensor] = {}

    def get(self, key: str) -> Tensor | None:
        """State an earlier layer passed on under ``key`` (None for the first layer using it)."""
        return self._carried.get(key)

    def pass_on(self, key: str, value: Tensor) -> None:
        """Hand ``value`` to the next layers under ``key``."""
        self._passed[key] = value

    def next_layer(self) -> RoutingContext:
        """The context of the next layer: the same token ids, the state as this layer left it."""
        return RoutingContext(self.token_ids, self._carried | self._passed)


@dataclass
class RoutingStats:
    """Detached routing statistics of one forward of one layer (all counts over valid tokens).

    Counts (not fractions) are kept so that statistics from several micro-batches, layers or ranks
    can be summed exactly before dividing.
    """

    num_tokens: Tensor  # valid tokens seen
    num_experts: int
    tokens_per_expert: Tensor | None = None  # long [E]; None for layers with too many experts
    router_nonzero: Tensor | None = None  # (token, expert) router outputs > 0 (selected for TopK)
    router_total: Tensor | None = None  # valid tokens * E
    active_min: Tensor | None = None  # active experts per token
    active_max: Tensor | None = None
    active_sum: Tensor | None = None
    dropped: Tensor | None = None  # assignments dropped by capacity
    assigned: Tensor | None = None  # assignments before dropping
    distinct_experts: Tensor | None = None  # PEER/PKM: distinct experts hit in this forward
    # forward FLOPs the routed experts really spent: computed assignments (after capacity drops,
    # without null / zero-computation picks) x ``assignment_flops``; shared experts and the router
    # are fixed per token and left to the model's accounting
    expert_flops: Tensor | None = None
    extra: dict[str, Tensor] = field(default_factory=dict)

    # Counts that add up across micro-batches (``merge``); min / max / distinct are combined apart.
    SUMMED: ClassVar[tuple[str, ...]] = (
        "num_tokens",
        "tokens_per_expert",
        "router_nonzero",
        "router_total",
        "active_sum",
        "dropped",
        "assigned",
        "expert_flops",
    )

    def merge(self, other: RoutingStats | None) -> RoutingStats:
        """Sum the counts of two forwards' statistics (micro-batches of one step)."""
        if other is None:
            return self
        out = replace(self, extra=dict(other.extra))
        for name in self.SUMMED:
            x, y = getattr(self, name), getattr(other, name)
            setattr(out, name, None if x is None or y is None else x + y)
        if self.active_min is not None and other.active_min is not None:
            out.active_min = torch.minimum(self.active_min, other.active_min)
            out.active_max = torch.maximum(self.active_max, other.active_max)
        if self.distinct_experts is not None and other.distinct_experts is not None:
            out.distinct_experts = torch.maximum(self.distinct_experts, other.distinct_experts)
        return out

    @property
    def sparsity(self) -> float:
        """Fraction of router outputs that are exactly zero (ReMoE's S for this layer)."""
        if self.router_nonzero is None or self.router_total is None:
            return float("nan")
        total = float(self.router_total)
        return 1.0 - float(self.router_nonzero) / total if total > 0 else float("nan")

    @property
    def active_mean(self) -> float:
        if self.active_sum is None:
            return float("nan")
        n = float(self.num_tokens)
        return float(self.active_sum) / n if n > 0 else float("nan")

    @property
    def dropped_fraction(self) -> float:
        if self.dropped is None or self.assigned is None or float(self.assigned) == 0:
            return 0.0
        return float(self.dropped) / float(self.assigned)

    def as_dict(self) -> dict[str, float | list[int]]:
        """Plain-Python view for logs (this is where a device sync happens, once)."""
        out: dict[str, float | list[int]] = {"num_tokens": float(self.num_tokens)}
        if self.router_nonzero is not None:
            out["sparsity"] = self.sparsity
        if self.active_sum is not None:
            out["active_mean"] = self.active_mean
            out["active_min"] = float(self.active_min)
            out["active_max"] = float(self.active_max)
        if self.dropped is not None:
            out["dropped_fraction"] = self.dropped_fraction
        if self.tokens_per_expert is not None:
            out["tokens_per_expert"] = [int(v) for v in self.tokens_per_expert.tolist()]
        if self.distinct_experts is not None:
            out["distinct_experts"] = float(self.distinct_experts)
        if self.expert_flops is not None:
            out["expert_flops"] = float(self.expert_flops)
        for k, v in self.extra.items():
            out[k] = float(v)
        return out


RoutingObserver = Callable[["RoutedLayer", RoutingDecision, Tensor], None]


class RoutedLayer(nn.Module):
    """Base class of every layer that routes tokens; see the module docstring for the contract."""

    def __init__(self) -> None:
        super().__init__()
        self.aux_losses: dict[str, Tensor] = {}
        self.aux_coefficients: dict[str, float] = {}
        self.controlled_loss: str | None = None
        self.last_stats: RoutingStats | None = None
        self.assignment_flops: int = 0  # FLOPs of one computed assignment (module docstring)
        self.force_stats: bool = False
        self.routing_observer: RoutingObserver | None = None

    @property
    def sparsity_target(self) -> float | None:
        """Target fraction of zero router outputs for the λ controller (None: not controlled)."""
        return None

    def should_record(self) -> bool:
        """Statistics and aux losses come only from training forwards with grad (or when forced)."""
        return (self.training and torch.is_grad_enabled()) or self.force_stats


def routed_layers(model: nn.Module) -> list[RoutedLayer]:
    """All routed layers of a model, in module order."""
    return [m for m in model.modules() if isinstance(m, RoutedLayer)]


def collect_aux_losses(layers: Iterable[RoutedLayer]) -> dict[str, Tensor]:
    """Average each named aux loss over the layers that produced it (the ``1/L`` of the papers).

    Averaging per name keeps each layer's balance term computed from its own statistics; layers are
    never concatenated before the loss: a balance term over the concatenation of all layers' tokens
    would let one layer's imbalance be offset by another's.
    """
    sums: dict[str, Tensor] = {}
    counts: dict[str, int] = {}
    for layer in layers:
        for name, value in layer.aux_losses.items():
            sums[name] = sums[name] + value if name in sums else value
            counts[name] = counts.get(name, 0) + 1
    return {name: sums[name] / counts[name] for name in sums}


def fixed_aux_loss(layers: Iterable[RoutedLayer]) -> Tensor | None:
    """``Σ_layers Σ_name coef · loss`` over the aux losses with a fixed coefficient.

    Each layer's term is computed from its own statistics and the terms are **summed** over layers,
    as ReMoE's reference code (Megatron-LM's per-layer aux-loss scaler) does for its TopK baseline:
    a coefficient of 0.01 acts on every layer with its full weight, whatever the depth. (Averaging
    over layers instead would weaken the balance pressure L-fold.) Logs show the layer mean
    (:func:`collect_aux_losses`), as Megatron's do.

    The controlled loss of a layer (its coefficient adapted between steps) is left to the
    controller's ``penalty(layers)``; a loss that is neither fixed nor controlled is an error, never
    silently dropped. Returns None when no layer recorded a fixed-coefficient loss.
    """
    total: Tensor | None = None
    for layer in layers:
        for name, value in layer.aux_losses.items():
            if name == layer.controlled_loss:
                continue
            if name not in layer.aux_coefficients:
                raise KeyError(
                    f"aux loss {name!r} has neither a fixed coefficient nor a controller"
                )
            term = value * layer.aux_coefficients[name]
            total = term if total is None else total + term
    return total
