"""Low-precision experts on a miss (HOBBIT: Tang et al. 2024, "HOBBIT: A Mixed Precision Expert
Offloading System for Fast MoE Inference").

HOBBIT's observation: when an expert misses the cache, the token often gives it a small gate
weight, so its output enters the layer's sum scaled down, and a low-precision version of that
expert costs little quality while saving the wait for the full one. Here every expert has a
resident int8 (or int4) weight-only, group-wise copy, made at start-up with the project's
quantization formats (:mod:`moelab.layers.quant_formats`, torchao's primitives: no second
quantizer); its bytes are part of the ``--expert-memory`` budget (the full-precision cache gets
what is left). On a miss, an expert is computed from its copy when *every* row routed to it has
a gate weight below ``threshold`` times its token's top gate weight (relative, so the rule means
the same for softmax top-k and for ReLU routers, whose weights are not normalised); the full
expert is then not read for that token, nor loaded in the background (the bytes it would have
read are counted as saved); a later token that weights it highly loads it on demand as usual.
With a threshold of 0 no expert is ever below it: outputs are the plain offloaded ones.
"""

from __future__ import annotations

import torch
from torch import Tensor

from moelab.layers.quant_experts import QuantizedExperts
from moelab.layers.quant_formats import QUANT_GROUPS, torchao_primitives
from moelab.serve.options import MISS_PRECISIONS

__all__ = ["DEFAULT_THRESHOLD", "LowPrecisionExperts", "check_miss_options"]

DEFAULT_THRESHOLD = 0.5  # of the token's top gate weight (see docs/inference.md for the choice)


def check_miss_options(precision: str | None, threshold: float) -> None:
    """One-line ValueErrors naming the option and the allowed values; torchao must be importable
    (the ``compress`` extra) before any work is done."""
    if precision is None:
        return
    if precision not in MISS_PRECISIONS:
        raise ValueError(
            f"--miss-precision: must be one of {', '.join(MISS_PRECISIONS)}, got {precision!r}"
        )
    if (
        isinstance(threshold, bool)
        or not isinstance(threshold, int | float)
        or not 0.0 <= threshold <= 1.0
    ):
        raise ValueError(
            f"--miss-threshold: must be a number in [0, 1] (a share of the token's top gate "
            f"weight), got {threshold!r}"
        )
    try:
        torchao_primitives()
    except ValueError:
        raise ValueError(
            "--miss-precision: low-precision experts need torchao, the 'compress' extra "
            "(pip install 'moelab[compress]')"
        ) from None


def miss_group(precision: str, d_model: int, d_hidden: int) -> int:
    """The largest group size of ``precision`` that divides both matrices' input widths (fewest
    scale bytes, so the most budget left to the full-precision cache)."""
    fits = [g for g in QUANT_GROUPS[precision] if not d_model % g and not d_hidden % g]
    if not fits:
        raise ValueError(
            f"--miss-precision: {precision} needs a group size from {QUANT_GROUPS[precision]} "
            f"dividing d_model ({d_model}) and the expert width ({d_hidden}); none does"
            + (" (int8 allows smaller groups)" if precision == "int4" else "")
        )
    return max(fits)


class LowPrecisionExperts:
    """One :class:`QuantizedExperts` per offloaded MoE layer (all experts in the low bank).

    Built empty (its buffers are allocated, so :meth:`nbytes` is what it will hold); filled by
    :meth:`fill` one expert at a time, so no layer's full-precision experts are ever all in memory.
    """

    def __init__(self, precision: str, experts: list) -> None:
        self.precision = precision
        self.layers = []
        for ex in experts:  # the model's GroupedExperts (possibly on the meta device)
            group = miss_group(precision, ex.d_model, ex.d_hidden)
            q = QuantizedExperts(
                ex.num_experts, ex.d_model, ex.d_hidden, ex.activation, precision, group
            )
            self.layers.append(q)

    def nbytes(self) -> int:
        """Bytes of every copy, measured from the buffers' storages."""
        return sum(b.untyped_storage().nbytes() for q in self.layers for b in q.buffers())

    @torch.no_grad()
    def fill(self, read) -> None:
        """Quantize every expert; ``read(layer, expert) -> (w13_DF2, w2_FD)`` gives its weights."""
        for n, q in enumerate(self.layers):
            for e in range(q.num_experts):
                w13, w2 = read(n, e)
                q.low.set_(e, "w13", w13)
                q.low.set_(e, "w2", w2)

    def run(self, layer: int, expert: int, x_nD: Tensor, weight_n: Tensor) -> Tensor:
        """:meth:`expert` times the rows' gates."""
        y_nD = self.expert(layer, expert, x_nD)
        return y_nD * weight_n.to(y_nD.dtype)[:, None]

    def expert(self, layer: int, expert: int, x_nD: Tensor) -> Tensor:
        """Expert ``expert`` of ``layer`` from its copy on rows ``x_nD``, ungated: that one
        expert's matmuls (every expert is in the low bank, at its own slot), not the layer's
        forward over all E experts' (mostly empty) slices."""
        q = self.layers[layer]
        return q.expert_output(q.low, expert, x_nD.float()).to(x_nD.dtype)

    def dequantized(self, layer: int, expert: int) -> tuple[Tensor, Tensor]:
        """``(w13 [D, 2F], w2 [F, D])``: the float weights the copy computes with."""
        bank = self.layers[layer].low
        return bank.dequantized(expert, "w13"), bank.dequantized(expert, "w2")
