"""Where metrics go: the run's metrics file (always), TensorBoard and W&B (on request), tqdm.

Kept out of the trainer so the training loop reads as training. Every sink gets the same flat
records (see ``docs/CONTRACTS.md`` "Runs"); optional backends are imported lazily and a missing one
is a clear error at start-up, before any training.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Iterator, Mapping
from typing import IO, Any

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
    """What training shows on stdout while it runs.

    On a terminal a tqdm bar over optimizer steps (tokens/s, loss and, for ReMoE, sparsity and
    λ); elsewhere (a log file, a pipe, CI) one plain line per ``log_every`` steps instead, since a
    bar redrawn with carriage returns becomes one huge line there. Validation results and warnings
    raised during training are written as single lines above the bar (:meth:`write`,
    :meth:`show_warning`), so they neither break the bar nor get lost. ``enabled=False``
    (``logging.progress: false``) shows neither the bar nor the lines; warnings still print.
    """

    def __init__(
        self,
        total: int,
        initial: int,
        enabled: bool,
        desc: str,
        *,
        log_every: int = 10,
        stream: IO[str] | None = None,
    ) -> None:
        from tqdm.auto import tqdm

        self.stream = stream if stream is not None else sys.stdout
        self.enabled = enabled
        self.plain = enabled and not _is_terminal(self.stream)
        self.total, self.step, self.log_every = total, initial, log_every
        self.bar = tqdm(
            total=total,
            initial=initial,
            disable=not enabled or self.plain,
            desc=desc,
            unit="step",
            dynamic_ncols=True,
            file=self.stream,
        )

    def update(self, record: Mapping[str, Any]) -> None:
        """Advance by one optimizer step (``record``: the step's metrics line)."""
        self.step = int(record["step"])
        loss, tps = record["loss"], record["tokens_per_s"]
        sparsity, lam = record.get("sparsity"), record.get("lambda_next")
        if self.plain:
            if self.step % self.log_every == 0 or self.step == self.total:
                line = f"step {self.step}/{self.total}  loss {loss:.4f}  tokens/s {tps:,.0f}"
                if sparsity is not None:
                    line += f"  sparsity {sparsity:.3f}"
                if lam is not None:
                    line += f"  λ {lam:.3e}"
                self.write(line)
            return
        post = {"loss": f"{loss:.3f}", "tok/s": f"{tps:,.0f}"}
        if sparsity is not None:
            post["sparsity"] = f"{sparsity:.3f}"
        if lam is not None:
            post["λ"] = f"{lam:.2e}"
        self.bar.set_postfix(post, refresh=False)
        self.bar.update(1)

    def show_eval(self, record: Mapping[str, Any]) -> None:
        """One line for a validation pass (an ``eval`` metrics line)."""
        if not self.enabled:
            return
        by_domain = ", ".join(f"{k} {v:.3f}" for k, v in record["val_loss_by_domain"].items())
        line = f"step {record['step']}: val loss {record['val_loss']:.4f} "
        line += f"(ppl {record['val_ppl']:.1f})"
        self.write(f"{line}; {by_domain}" if by_domain else line)

    def write(self, line: str, file: IO[str] | None = None) -> None:
        """Print ``line`` above the bar (the bar is redrawn below it)."""
        self.bar.write(line, file=file if file is not None else self.stream)

    def show_warning(
        self,
        message: Warning | str,
        category: type[Warning],
        filename: str,
        lineno: int,
        file: IO[str] | None = None,
        line: str | None = None,
    ) -> None:
        """A ``warnings.showwarning`` replacement: one line on stderr, without the source line
        Python would echo, written above the bar instead of into it."""
        text = " ".join(str(message).split())
        self.write(f"warning: {category.__name__}: {text}", file=sys.stderr)

    def close(self) -> None:
        self.bar.close()


def _is_terminal(stream: IO[str]) -> bool:
    """Whether a redrawn bar displays as one: a TTY, or a Jupyter kernel (tqdm's widget)."""
    try:
        if stream.isatty():
            return True
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        pass
    return "ipykernel" in sys.modules
