"""Where metrics go: the run's metrics file (always), TensorBoard and W&B (on request), tqdm.

Kept out of the trainer so the training loop reads as training. Every sink gets the same flat
records (see ``docs/CONTRACTS.md`` "Runs"); optional backends are imported lazily and a missing one
is a clear error at start-up, before any training.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from typing import Any

from moelab.rundir import RunDir
from moelab.train.config import LoggingConfig, RunConfig

__all__ = ["MetricsLogger", "Progress", "check_backends", "flatten"]


def flatten(record: Mapping[str, Any], prefix: str = "") -> Iterator[tuple[str, float]]:
    """Scalar leaves of a nested record as ``("a/b/c", value)`` (lists and text are skipped)."""
    for key, value in record.items():
        name = f"{prefix}/{key}" if prefix else str(key)
        if isinstance(value, Mapping):
            yield from flatten(value, name)
        elif isinstance(value, bool):
            continue
        elif isinstance(value, int | float) and math.isfinite(value):
            yield name, float(value)


def check_backends(cfg: LoggingConfig) -> None:
    """Fail before training when an optional logging backend is requested but not installed."""
    if cfg.tensorboard:
        try:
            import tensorboard  # noqa: F401
        except ImportError:
            raise ValueError(
                "logging.tensorboard: needs the 'tensorboard' package; install it with "
                "pip install 'moelab[tensorboard]' or set logging.tensorboard=false"
            ) from None
    if cfg.wandb:
        try:
            import wandb  # noqa: F401
        except ImportError:
            raise ValueError(
                "logging.wandb: needs the 'wandb' package; install it with pip install wandb "
                "or set logging.wandb=false"
            ) from None


class MetricsLogger:
    """Appends records to the run's metrics file and mirrors scalars to TB / W&B."""

    def __init__(self, run: RunDir, config: RunConfig) -> None:
        self._file = run.metrics_writer()
        self._tb = None
        self._wandb = None
        cfg = config.logging
        if cfg.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(run.tensorboard_dir))
        if cfg.wandb:
            import wandb

            self._wandb = wandb.init(
                project=cfg.wandb_project,
                dir=str(run.path),
                mode="offline",
                name=run.name,
                config=config.to_dict(),
                resume="allow",
            )

    def log(self, record: dict[str, Any]) -> None:
        self._file.write(record)
        step = int(record.get("step", 0))
        kind = record.get("kind", "train")
        scalars = {f"{kind}/{k}": v for k, v in flatten(record) if k not in ("step", "kind")}
        if self._tb is not None:
            for k, v in scalars.items():
                self._tb.add_scalar(k, v, step)
        if self._wandb is not None:
            self._wandb.log(scalars, step=step)

    def close(self) -> None:
        self._file.close()
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()


class Progress:
    """A tqdm bar over optimizer steps showing tokens/s, loss and (ReMoE) sparsity and λ."""

    def __init__(self, total: int, initial: int, enabled: bool, desc: str) -> None:
        from tqdm.auto import tqdm

        self.bar = tqdm(
            total=total,
            initial=initial,
            disable=not enabled,
            desc=desc,
            unit="step",
            dynamic_ncols=True,
        )

    def update(self, loss: float, tokens_per_s: float, sparsity: float | None, lam: float | None):
        post = {"loss": f"{loss:.3f}", "tok/s": f"{tokens_per_s:,.0f}"}
        if sparsity is not None:
            post["sparsity"] = f"{sparsity:.3f}"
        if lam is not None:
            post["λ"] = f"{lam:.2e}"
        self.bar.set_postfix(post, refresh=False)
        self.bar.update(1)

    def close(self) -> None:
        self.bar.close()
