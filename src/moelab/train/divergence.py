"""What training does with a step whose loss or gradient norm is not finite: train.on_nonfinite.

A diverged run (a learning rate far too high, an overflow under bf16) otherwise trains on with
``loss nan``, saves NaN weights over its good checkpoints and exits 0. The trainer never applies
such a step's update (the optimizer does not step, the between-step hooks forget the step's
observations) and then, by the run's setting:

* ``stop`` (default): the step is logged (``"nonfinite": true``), nothing of it is saved, and the
  run ends with :class:`Diverged`, one line naming the step and the last good checkpoint (the
  command exits non-zero);
* ``skip``: the step counts as done without an update (``"skipped": true`` in its metrics line,
  a warning line), and training goes on; after :data:`MAX_CONSECUTIVE_SKIPS` such steps in a row
  the run stops as with ``stop``, since it is not recovering.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import Any

__all__ = ["MAX_CONSECUTIVE_SKIPS", "Diverged", "NonFiniteGuard", "is_finite_step"]

MAX_CONSECUTIVE_SKIPS = 10


class Diverged(ValueError):
    """Training stopped at a step with a non-finite loss or gradient norm (one line naming it)."""


def is_finite_step(loss: float, grad_norm: float) -> bool:
    """Whether a step may be applied: its loss and gradient norm are finite."""
    return math.isfinite(loss) and math.isfinite(grad_norm)


class NonFiniteGuard:
    """Counts non-finite steps and decides, by ``policy`` (``"stop"`` / ``"skip"``), whether
    training goes on; sees every step's metrics record through :meth:`check`."""

    def __init__(self, policy: str) -> None:
        self.policy = policy
        self.in_a_row = 0  # consecutive non-finite steps so far

    @property
    def skips(self) -> bool:
        """A non-finite step is skipped (else training stops at it)."""
        return self.policy == "skip"

    def check(self, record: dict[str, Any], last_checkpoint: Path | None) -> None:
        """After a step: nothing for a finite one; for a non-finite one, a warning (``skip``)
        or :class:`Diverged` naming the step and ``last_checkpoint`` (``stop``, or too many
        skips in a row)."""
        if not record.get("nonfinite"):
            self.in_a_row = 0
            return
        self.in_a_row += 1
        step = record["step"]
        what = f"loss {record['loss']}, gradient norm {record['grad_norm']}"
        if self.skips and self.in_a_row < MAX_CONSECUTIVE_SKIPS:
            warnings.warn(
                f"step {step}: {what}; skipped without an update (train.on_nonfinite=skip)",
                RuntimeWarning,
                stacklevel=2,
            )
            return
        kept = (
            f"the last good checkpoint is {last_checkpoint}"
            if last_checkpoint is not None
            else "no checkpoint was saved before it"
        )
        if self.skips:
            why = f"{self.in_a_row} steps in a row were not finite (train.on_nonfinite=skip)"
            advice = "lower optim.lr"
        else:
            why = "training stopped (train.on_nonfinite=stop)"
            advice = "lower optim.lr, or set train.on_nonfinite=skip to skip such steps"
        raise Diverged(f"step {step}: {what}: {why}, nothing of it saved; {kept} ({advice})")
