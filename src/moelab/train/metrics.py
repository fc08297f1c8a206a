"""Where metrics go: ``metrics.jsonl`` (always), TensorBoard and W&B offline (on request), tqdm.

Kept out of the trainer so the training loop reads as training. Every sink gets the same flat
records (see ``docs/CONTRACTS.md`` "Runs"); optional backends are imported lazily and a missing one
is a clear error at start-up, before any training.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from moelab.train.config import LoggingConfig, RunConfig

__all__ = ["MetricsLogger", "Progress", "check_backends", "flatten", "read_metrics"]


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
    """Appends JSON lines to ``RUN_DIR/metrics.jsonl`` and mirrors scalars to TB / W&B."""

    def __init__(self, run_dir: str | Path, config: RunConfig) -> None:
        self.path = Path(run_dir) / "metrics.jsonl"
        self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - closed in close()
        self._tb = None
        self._wandb = None
        cfg = config.logging
        if cfg.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(Path(run_dir) / "tensorboard"))
        if cfg.wandb:
            import wandb

            self._wandb = wandb.init(
                project=cfg.wandb_project,
                dir=str(run_dir),
                mode="offline",
                name=Path(run_dir).name,
                config=config.to_dict(),
                resume="allow",
            )

    def log(self, record: dict[str, Any]) -> None:
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
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


def read_metrics(run_dir: str | Path, kind: str | None = None) -> list[dict[str, Any]]:
    """All records of ``metrics.jsonl`` (optionally only one ``kind``)."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return []
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in records if kind is None or r.get("kind") == kind]


def truncate_metrics(run_dir: str | Path, step: int) -> None:
    """Drop records after ``step`` (a resumed run rewrites what followed its checkpoint)."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return
    keep = [
        line
        for line in path.read_text().splitlines()
        if line.strip() and json.loads(line).get("step", 0) <= step
    ]
    tmp = path.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(line + "\n" for line in keep))
    tmp.replace(path)


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

    def write(self, text: str) -> None:
        self.bar.write(text)

    def close(self) -> None:
        self.bar.close()
