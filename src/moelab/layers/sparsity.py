"""ReMoE's adaptive L1 coefficient: one controller per model, stepped once per optimizer step."""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable

import torch
import torch.distributed as dist

from moelab.layers.base import RoutedLayer


def _check_finite_positive(name: str, value: float) -> None:
    if not isinstance(value, int | float) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")


def next_lambda(lam: float, alpha: float, target: float, sparsity: float) -> float:
    """ReMoE's update (arXiv 2412.14711, eq. 8): ``λ ← λ · α^sign(S* − S)``.

    At ``S == S*`` the reference implementation divides by α (sign taken as −1); we follow it.
    The product is rounded to float32, the precision λ is kept in.
    """
    factor = alpha if target > sparsity else 1.0 / alpha
    return float(torch.tensor(lam * factor, dtype=torch.float32))


class SparsityController:
    """Drives the fraction of zero ReLU-router outputs to ``target = 1 − k/E``.

    Between-step state lives here, never in a forward: the trainer calls :meth:`observe` after each
    micro-batch forward (it sums the layers' ``router_nonzero``/``router_total`` counts) and
    :meth:`step` once per optimizer step, after all micro-batches. The step's sparsity is therefore
    averaged over layers, micro-batches and (when ``torch.distributed`` is initialised)
    data-parallel ranks, weighted by tokens. ``lam`` is a Python float kept at float32 precision, so
    it is untouched by ``model.half()``/``bfloat16()``; it is saved by :meth:`state_dict`.
    """

    def __init__(self, target: float, lambda0: float = 1e-8, alpha: float = 1.2) -> None:
        if not isinstance(target, int | float) or not math.isfinite(target) or not 0 < target < 1:
            raise ValueError(f"target must be a finite number in (0, 1), got {target!r}")
        _check_finite_positive("lambda0", lambda0)
        _check_finite_positive("alpha", alpha)
        if alpha <= 1:
            raise ValueError(f"alpha must be > 1 (1.2 in the paper), got {alpha!r}")
        self.target = float(target)
        self.alpha = float(alpha)
        self.lambda0 = float(lambda0)
        self.lam = float(torch.tensor(lambda0, dtype=torch.float32))
        self.steps = 0
        self.last_sparsity = float("nan")
        self.last_layer_sparsity: list[float] = []  # per observed layer, in observe() order
        self._nonzero = 0
        self._total = 0
        self._layer_counts: list[list[int]] = []  # [nonzero, total] per layer position
        self._warned_collapse = False

    def observe(self, layers: Iterable[RoutedLayer]) -> None:
        """Add the last forward's router counts of ``layers`` (layers without them are skipped)."""
        position = 0
        for layer in layers:
            stats = layer.last_stats
            if stats is None or stats.router_nonzero is None or stats.router_total is None:
                continue
            nonzero, total = int(stats.router_nonzero), int(stats.router_total)
            self._nonzero += nonzero
            self._total += total
            if position == len(self._layer_counts):
                self._layer_counts.append([0, 0])
            self._layer_counts[position][0] += nonzero
            self._layer_counts[position][1] += total
            position += 1

    def step(self) -> float:
        """Update λ from the sparsity accumulated since the last step; return that sparsity."""
        counts = torch.tensor([self._nonzero, self._total], dtype=torch.float64)
        if dist.is_available() and dist.is_initialized():
            device = "cuda" if dist.get_backend() == "nccl" else "cpu"
            counts = counts.to(device)
            dist.all_reduce(counts)
            counts = counts.cpu()
        nonzero, total = counts.tolist()
        self._nonzero = self._total = 0
        self.last_layer_sparsity = [
            1.0 - nz / t if t else float("nan") for nz, t in self._layer_counts
        ]
        self._layer_counts = []
        self._warn_on_collapse()
        if total <= 0:
            raise RuntimeError(
                "SparsityController.step() saw no router outputs since the last step: call "
                "observe(model.routed_layers()) after each training forward"
            )
        sparsity = 1.0 - nonzero / total
        self.lam = next_lambda(self.lam, self.alpha, self.target, sparsity)
        self.steps += 1
        self.last_sparsity = sparsity
        return sparsity

    def _warn_on_collapse(self) -> None:
        """One λ for all layers can drive a single layer to 100% sparsity (its tokens then keep only
        the residual path) while the average sits at the target: say so once (PITFALLS)."""
        collapsed = [i for i, s in enumerate(self.last_layer_sparsity) if s == 1.0]
        if collapsed and not self._warned_collapse and len(self.last_layer_sparsity) > 1:
            self._warned_collapse = True
            warnings.warn(
                f"ReMoE routed layer(s) {collapsed} (in model order) have collapsed to 100% "
                "sparsity: no token reaches any of their experts",
                RuntimeWarning,
                stacklevel=3,
            )

    def state_dict(self) -> dict[str, float | int]:
        return {
            "target": self.target,
            "alpha": self.alpha,
            "lambda0": self.lambda0,
            "lam": self.lam,
            "steps": self.steps,
            "last_sparsity": self.last_sparsity,
        }

    def load_state_dict(self, state: dict[str, float | int]) -> None:
        self.target = float(state["target"])
        self.alpha = float(state["alpha"])
        self.lambda0 = float(state["lambda0"])
        self.lam = float(state["lam"])
        self.steps = int(state["steps"])
        self.last_sparsity = float(state["last_sparsity"])
        self._nonzero = self._total = 0
        self._layer_counts = []

    def __repr__(self) -> str:
        return f"SparsityController(target={self.target}, lam={self.lam:.3e}, alpha={self.alpha})"
