"""Learning-rate schedule: linear warm-up, then a half cosine down to a floor (ReMoE: 5e-4 → 5e-5).

The schedule is a pure function of the optimizer step (:func:`lr_at`), so tests can check it against
the formula and a resumed run recomputes exactly the same values. :class:`WarmupCosineLR` is the
``LambdaLR`` that applies it; its parameters are part of its ``state_dict`` (saved in checkpoints),
and :meth:`WarmupCosineLR.retarget` points a restored one at a changed run length or lr.
"""

from __future__ import annotations

import dataclasses
import math

import torch

__all__ = ["CosineWithWarmup", "WarmupCosineLR", "build_scheduler", "lr_at"]


def lr_at(step: int, lr: float, warmup_steps: int, total_steps: int, min_lr_ratio: float) -> float:
    """The lr of optimizer step ``step`` (0-based: the first update uses ``step=0``).

    Warm-up: ``lr·(step+1)/warmup_steps`` for ``step < warmup_steps``, so the first update is not
    taken at lr 0. Then ``min + (lr − min)·½(1 + cos(π·p))`` with ``min = min_lr_ratio·lr`` and
    ``p = (step − warmup)/(total − 1 − warmup)`` going from 0 to 1, so the last step uses ``min``.
    """
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    floor = min_lr_ratio * lr
    span = total_steps - 1 - warmup_steps
    progress = 1.0 if span <= 0 else min(1.0, (step - warmup_steps) / span)
    return floor + (lr - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


@dataclasses.dataclass
class CosineWithWarmup:
    """``LambdaLR`` multiplier of :func:`lr_at` (plain attributes, so ``state_dict`` keeps them)."""

    warmup_steps: int
    total_steps: int
    min_lr_ratio: float

    def __call__(self, step: int) -> float:
        return lr_at(step, 1.0, self.warmup_steps, self.total_steps, self.min_lr_ratio)


class WarmupCosineLR(torch.optim.lr_scheduler.LambdaLR):
    """A ``LambdaLR`` over every param group: group lr = its base lr × the :func:`lr_at` multiplier.

    Its ``state_dict`` is ``LambdaLR``'s (the multiplier's parameters included), so checkpoints
    written before this class existed load into it.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        warmup_steps: int,
        total_steps: int,
        min_lr_ratio: float,
    ) -> None:
        super().__init__(optimizer, CosineWithWarmup(warmup_steps, total_steps, min_lr_ratio))

    def retarget(self, lr: float, warmup_steps: int, total_steps: int, min_lr_ratio: float) -> None:
        """Follow new settings from the current step on (a resumed run may change ``train.steps``
        or ``optim.*``) and set every group's lr for that step."""
        fn = self.lr_lambdas[0]  # one multiplier object shared by every group
        assert isinstance(fn, CosineWithWarmup)
        fn.warmup_steps, fn.total_steps, fn.min_lr_ratio = warmup_steps, total_steps, min_lr_ratio
        self.base_lrs = [lr for _ in self.optimizer.param_groups]
        for group in self.optimizer.param_groups:
            group["initial_lr"] = lr
            group["lr"] = lr * fn(self.last_epoch)


def build_scheduler(
    optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int, min_lr_ratio: float
) -> WarmupCosineLR:
    """The run's lr schedule over every param group of ``optimizer``."""
    return WarmupCosineLR(optimizer, warmup_steps, total_steps, min_lr_ratio)
