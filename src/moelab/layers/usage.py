"""Expert usage statistics of the product-key layers (PEER §3.3): usage, unevenness, duplication.

:func:`usage_and_unevenness` is the one formula, used by the layers' :class:`UsageTracker` and by
:func:`moelab.analysis.stats.usage_unevenness`. Shape legend (see ``moelab.layers.base``):
N experts (table rows), T tokens, H heads, K top-k.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from moelab.layers.product_keys import duplicated_retrievals


def usage_and_unevenness(z_prime_N: Tensor) -> tuple[float, float]:
    """PEER §3.3: usage = fraction of experts with ``z'_i ≠ 0``; unevenness = ``log N + Σ z log z``
    with ``z = z'/‖z'‖₁`` (0·log 0 = 0). Unevenness is 0 for perfectly even use, log N at worst."""
    n = z_prime_N.numel()
    z = z_prime_N.double()
    total = z.abs().sum()
    usage = float((z != 0).sum()) / n
    if total == 0:
        return usage, float("nan")
    z = z.abs() / total
    nz = z[z > 0]
    return usage, float(math.log(n) + (nz * nz.log()).sum())


class UsageTracker:
    """Evaluation accumulator of ``z'_i = Σ_x g_i(x)`` and head duplication over a pass."""

    def __init__(self, num_experts: int, device: torch.device | str = "cpu") -> None:
        self.z_prime = torch.zeros(num_experts, dtype=torch.float64, device=device)
        self.tokens = 0
        self.retrievals = 0
        self.duplicates = 0

    @torch.no_grad()
    def update(self, idx_THK: Tensor, gate_THK: Tensor) -> None:
        """Add one forward's valid tokens (already masked) to the totals."""
        self.z_prime.index_add_(0, idx_THK.reshape(-1), gate_THK.reshape(-1).double())
        self.tokens += int(idx_THK.shape[0])
        self.retrievals += int(idx_THK.numel())
        self.duplicates += int(duplicated_retrievals(idx_THK).sum())

    def report(self) -> dict[str, float]:
        usage, unevenness = usage_and_unevenness(self.z_prime)
        dup = self.duplicates / self.retrievals if self.retrievals else float("nan")
        return {
            "usage": usage,
            "unevenness": unevenness,
            "duplicate_fraction": dup,
            "tokens": float(self.tokens),
            "num_experts": float(self.z_prime.numel()),
        }
