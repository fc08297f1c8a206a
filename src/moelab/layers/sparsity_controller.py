"""ReMoE's adaptive L1 coefficient: one controller per model, stepped once per optimizer step."""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable

import torch
from torch import Tensor

from moelab.layers.base import RoutedLayer, RoutingStats
from moelab.layers.ranks import SumsOverRanks


def _check_finite_positive(name: str, value: float) -> None:
    if not isinstance(value, int | float) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")


LAMBDA_MIN = 1e-20
"""Default floor of λ. Without one, ~460 consecutive decreases from 1e-8 reach the float32
denormal 2.8e-45, where ``λ·1.2`` rounds back to λ: the controller could never raise it again.
From the floor, 150 increases bring λ back to 1e-8."""
LAMBDA_MAX = 1e6
"""Default ceiling of λ (an L1 term a million times the LM loss has long stopped being useful;
without a ceiling a target the router cannot reach would drive λ to inf and the loss to NaN)."""


def next_lambda(
    lam: float,
    alpha: float,
    target: float,
    sparsity: float,
    lam_min: float = LAMBDA_MIN,
    lam_max: float = LAMBDA_MAX,
) -> float:
    """ReMoE's update (arXiv 2412.14711, eq. 8): ``λ ← λ · α^sign(S* − S)``, kept in
    ``[lam_min, lam_max]``.

    At ``S == S*`` the reference implementation divides by α (sign taken as −1); we follow it.
    A NaN sparsity (a layer that saw no valid token this step) leaves λ unchanged. The product is
    rounded to float32, the precision λ is kept in.
    """
    if math.isnan(sparsity):
        return lam
    factor = alpha if target > sparsity else 1.0 / alpha
    return min(max(_f32(lam * factor), _f32(lam_min)), _f32(lam_max))


class SparsityController(SumsOverRanks):
    """Drives the fraction of zero ReLU-router outputs to ``target = 1 − k/E``.

    Between-step state lives here, never in a forward: the trainer calls :meth:`observe` after each
    micro-batch forward (it sums the layers' ``router_nonzero``/``router_total`` counts) and
    :meth:`step` once per optimizer step, after all micro-batches. The step's sparsity is therefore
    averaged over layers, micro-batches and data-parallel ranks (through the
    :class:`~moelab.layers.ranks.RankSum` the parallelism layer hands in with ``set_rank_sum``;
    none in one process), weighted by tokens. λ is a Python float kept at float32 precision, so
    it is untouched by ``model.half()``/``bfloat16()``; it is saved by :meth:`state_dict`.

    ``per_layer=True`` keeps one λ per routed layer, each driven by its own layer's sparsity, so a
    layer cannot collapse to 100% sparsity while the average sits at the target (the paper uses
    one shared λ, the default). :meth:`penalty` applies whichever λ the controller keeps.
    """

    def __init__(
        self,
        target: float,
        lambda0: float = 1e-8,
        alpha: float = 1.2,
        per_layer: bool = False,
        lambda_min: float = LAMBDA_MIN,
        lambda_max: float = LAMBDA_MAX,
    ) -> None:
        if not isinstance(target, int | float) or not math.isfinite(target) or not 0 < target < 1:
            raise ValueError(f"target must be a finite number in (0, 1), got {target!r}")
        _check_finite_positive("lambda0", lambda0)
        _check_finite_positive("alpha", alpha)
        if alpha <= 1:
            raise ValueError(f"alpha must be > 1 (1.2 in the paper), got {alpha!r}")
        _check_finite_positive("lambda_min", lambda_min)
        _check_finite_positive("lambda_max", lambda_max)
        if not lambda_min <= lambda0 <= lambda_max:
            raise ValueError(
                f"lambda0 must lie in [lambda_min, lambda_max] = [{lambda_min}, {lambda_max}], "
                f"got {lambda0!r}"
            )
        self.lambda_min, self.lambda_max = float(lambda_min), float(lambda_max)
        self.target = float(target)
        self.alpha = float(alpha)
        self.lambda0 = float(lambda0)
        self.per_layer = bool(per_layer)
        self.lam = _f32(lambda0)  # the shared λ (per_layer: the mean of the layers' λ, for logs)
        self.layer_lams: list[float] = []  # per_layer only, in observe() order
        self.steps = 0
        self.last_sparsity = float("nan")
        self.last_layer_sparsity: list[float] = []  # per observed layer, in observe() order
        self._layer_counts: list[list[int]] = []  # [nonzero, total] per layer position
        self._warned_collapse = False

    def observe(self, layers: Iterable[RoutedLayer]) -> None:
        """Add the last forward's router counts of ``layers`` (layers without them are skipped)."""
        for position, stats in enumerate(_router_stats(layers)):
            if position == len(self._layer_counts):
                self._layer_counts.append([0, 0])
            self._layer_counts[position][0] += int(stats.router_nonzero)
            self._layer_counts[position][1] += int(stats.router_total)

    def step(self) -> float:
        """Update λ from the sparsity accumulated since the last step; return that sparsity."""
        counts_L2 = torch.tensor(self._layer_counts, dtype=torch.float64).reshape(-1, 2)
        counts_L2 = self.sum_over_ranks(counts_L2)
        self._layer_counts = []
        if not len(counts_L2):
            raise RuntimeError(
                "SparsityController.step() saw no router outputs since the last step: call "
                "observe(model.routed_layers()) after each training forward"
            )
        nonzero, total = counts_L2.sum(0).tolist()
        if total <= 0:  # observed, but every token of the step was padding: nothing to learn from
            self.steps += 1
            self.last_sparsity = float("nan")
            self.last_layer_sparsity = [float("nan")] * len(counts_L2)
            return self.last_sparsity
        self.last_layer_sparsity = [
            1.0 - nz / t if t else float("nan") for nz, t in counts_L2.tolist()
        ]
        sparsity = 1.0 - nonzero / total
        if self.per_layer:
            if not self.layer_lams:
                self.layer_lams = [_f32(self.lambda0)] * len(self.last_layer_sparsity)
            self.layer_lams = [
                next_lambda(lam, self.alpha, self.target, s, self.lambda_min, self.lambda_max)
                for lam, s in zip(self.layer_lams, self.last_layer_sparsity, strict=True)
            ]
            self.lam = _f32(sum(self.layer_lams) / len(self.layer_lams))
        else:
            self.lam = next_lambda(
                self.lam, self.alpha, self.target, sparsity, self.lambda_min, self.lambda_max
            )
            self._warn_on_collapse()
        self.steps += 1
        self.last_sparsity = sparsity
        return sparsity

    def penalty(self, layers: Iterable[RoutedLayer]) -> Tensor | None:
        """``Σ_l λ_l · L1_l`` over the layers that recorded their controlled loss (ReMoE's L1;
        None if none did).

        Summed over layers as ReMoE's reference code does (each layer attaches ``λ·L1_l`` to the
        graph); the paper's ``1/(L·T)`` would only rescale the λ the controller settles at by L.
        With one shared λ this is ``λ · Σ_l L1_l``; with ``per_layer`` each term has its own λ.
        """
        terms = [
            layer.aux_losses[layer.controlled_loss]
            for layer in layers
            if layer.controlled_loss is not None and layer.controlled_loss in layer.aux_losses
        ]
        if not terms:
            return None
        if not self.per_layer:
            return self.lam * sum(terms)
        lams = self.layer_lams or [self.lam] * len(terms)
        if len(lams) != len(terms):
            raise RuntimeError(f"per-layer λ for {len(lams)} layers, but {len(terms)} layers")
        return sum(lam * t for lam, t in zip(lams, terms, strict=True))

    def _warn_on_collapse(self) -> None:
        """One λ for all layers can leave a single layer nearly dead (its tokens then keep only the
        residual path) while the average sits at the target: say so, once. Nearly dead = fewer
        than a tenth of the target's share of active router outputs (0.99 sparsity for a target
        of 0.875), in a model with more than one routed layer."""
        limit = 1.0 - (1.0 - self.target) / 10
        dead = [i for i, s in enumerate(self.last_layer_sparsity) if s > limit]
        if dead and not self._warned_collapse and len(self.last_layer_sparsity) > 1:
            self._warned_collapse = True
            shares = ", ".join(f"{100 * (1 - self.last_layer_sparsity[i]):.1f}%" for i in dead)
            warnings.warn(
                f"ReMoE routed layer(s) {dead} (in model order) are nearly dead: {shares} of "
                f"router outputs active against the target's {100 * (1 - self.target):.1f}%; "
                "their tokens mostly keep only the residual path (a λ per layer prevents this: "
                "train.lambda_per_layer=true; see docs/results/remoe-collapse)",
                RuntimeWarning,
                stacklevel=3,
            )

    def state_dict(self) -> dict[str, object]:
        return {
            "target": self.target,
            "alpha": self.alpha,
            "lambda0": self.lambda0,
            "lambda_min": self.lambda_min,
            "lambda_max": self.lambda_max,
            "lam": self.lam,
            "per_layer": self.per_layer,
            "layer_lams": list(self.layer_lams),
            "steps": self.steps,
            "last_sparsity": self.last_sparsity,
        }

    def load_state_dict(self, state: dict[str, object]) -> None:
        """Restore the controller's *state* (λ, the per-layer λ, the step count); its settings
        (target, α, bounds, per-layer mode) stay those it was built with, so a resumed run that
        changes them (``train.lambda_alpha=...``, a new ``top_k``) uses the new ones. λ is kept
        within the current bounds; per-layer λ restored into a shared-λ controller become their
        mean (and a shared λ seeds every layer of a per-layer one)."""
        lam = float(state["lam"])
        layer_lams = [float(v) for v in state.get("layer_lams", [])]
        clamp = lambda v: min(max(v, self.lambda_min), self.lambda_max)  # noqa: E731
        self.lam = _f32(clamp(lam))
        self.layer_lams = [_f32(clamp(v)) for v in layer_lams] if self.per_layer else []
        self.steps = int(state["steps"])
        self.last_sparsity = float(state["last_sparsity"])
        self._layer_counts = []

    def __repr__(self) -> str:
        mode = ", per_layer=True" if self.per_layer else ""
        return (
            f"SparsityController(target={self.target}, lam={self.lam:.3e}, alpha={self.alpha}"
            f"{mode})"
        )


def _f32(value: float) -> float:
    return float(torch.tensor(value, dtype=torch.float32))


def _router_stats(layers: Iterable[RoutedLayer]) -> list[RoutingStats]:
    """The last stats of the layers that count router outputs (ReLU/TopK MoE), in order."""
    out = []
    for layer in layers:
        stats = layer.last_stats
        if (
            stats is not None
            and stats.router_nonzero is not None
            and stats.router_total is not None
        ):
            out.append(stats)
    return out
