"""The training loop of :class:`~moelab.train.trainer.Trainer`: steps, logging, periodic
evaluation and checkpoints, Ctrl-C, non-finite steps (``divergence.py``) and the summary.

A mixin: it reads the trainer's ``config``, ``rundir``, ``parallel``, ``controller``, ``dataset``,
``device``, ``accounting``, ``preset``, ``step``, ``elapsed`` and ``complete``, and calls its
:meth:`train_step`, :meth:`_eval_record` and :meth:`_save_with_elapsed`.
"""

from __future__ import annotations

import time
import warnings
from pathlib import Path
from typing import Any

from moelab.train.divergence import NonFiniteGuard
from moelab.train.metrics import MetricsLogger, Progress
from moelab.train.records import build_summary
from moelab.train.signals import StopOnCtrlC

__all__ = ["TrainingLoop"]


class TrainingLoop:
    """:meth:`run`: train to ``train.steps`` (see the module docstring)."""

    def run(self, stop_after: int | None = None) -> dict[str, Any]:
        """Train to ``train.steps`` (or stop, checkpointed, after step ``stop_after``: what Ctrl-C
        does); returns the summary (``interrupted`` tells which). A run that was already complete
        (:attr:`complete`) is left as it is and its summary returned. A non-finite step ends the
        run with :class:`~moelab.train.divergence.Diverged` (``train.on_nonfinite``). The run
        directory's lock is released at the end, whatever happened."""
        if self.complete:
            return self.rundir.read_summary()
        main = self.parallel.is_main  # the only rank that writes files and shows progress
        logger = MetricsLogger(self.rundir, self.config) if main else _NoLogger()
        try:
            return self._run(logger, stop_after)
        finally:
            logger.close()
            self.release_run_dir()

    def _run(self, logger: MetricsLogger | _NoLogger, stop_after: int | None) -> dict[str, Any]:
        cfg = self.config
        total = cfg.train.steps
        main = self.parallel.is_main
        guard = NonFiniteGuard(cfg.train.on_nonfinite)
        progress = Progress(
            total,
            self.step,
            cfg.logging.progress and main,
            cfg.method,
            log_every=cfg.logging.log_every,
        )
        start, tokens_at_start = time.perf_counter(), self.step * self._tokens_per_step
        last_t, last_step = start, self.step
        last_saved = self.step if self.step > 0 else -1
        interrupted = False
        record: dict[str, Any] = {}
        with StopOnCtrlC() as ctrl_c, warnings.catch_warnings():
            # one line above the bar (restored); other ranks' copies of a warning are not shown
            warnings.showwarning = progress.show_warning if main else _hide_warning
            try:
                while self.step < total:
                    record = self.train_step()
                    if record.get("nonfinite"):  # logged whatever log_every says
                        logger.log(record)
                        guard.check(record, self._last_checkpoint())
                    else:
                        guard.check(record, None)
                    now = time.perf_counter()
                    tps = (self.step - last_step) * self._tokens_per_step / max(now - last_t, 1e-9)
                    record["tokens_per_s"] = tps
                    progress.update(record)
                    logged = record.get("nonfinite")
                    if not logged and (
                        self.step % cfg.logging.log_every == 0
                        or self.step <= cfg.logging.log_each_step_until
                        or self.step == total
                    ):
                        logger.log(record)
                        last_t, last_step = now, self.step
                    if (
                        cfg.train.eval_every
                        and self.step % cfg.train.eval_every == 0
                        and self.step < total
                    ):
                        evaluated = self._eval_record()
                        logger.log(evaluated)
                        progress.show_eval(evaluated)
                        last_t, last_step = time.perf_counter(), self.step  # tokens/s: training
                    stop = self.parallel.any(ctrl_c.requested)  # all ranks stop at one step
                    stop = stop or (stop_after is not None and self.step >= stop_after)
                    every = cfg.checkpoint.every
                    if (every and self.step % every == 0) or self.step == total or stop:
                        self._save_with_elapsed(start)
                        last_saved = self.step
                        last_t, last_step = time.perf_counter(), self.step
                    if stop and self.step < total:
                        interrupted = True
                        break
            except KeyboardInterrupt:  # a second Ctrl-C, or one outside the main thread
                interrupted = True
                if self.parallel.distributed:  # ranks stopped at different points: no collective
                    raise
                if last_saved != self.step:
                    self._save_with_elapsed(start)
            finally:
                progress.close()
        wall = self.elapsed + (time.perf_counter() - start)
        if interrupted:
            if main:
                print(f"stopped at step {self.step}; checkpoint saved in {self.run_dir}")
            return {"interrupted": True, "steps": self.step, "run_dir": str(self.run_dir)}
        trained = self.step * self._tokens_per_step - tokens_at_start
        if not record:  # resumed at the last step (killed before its summary): finish it
            record = self._logged("train") or {}
        final = self._logged("eval") if not trained else None
        if final is None:
            final = self._eval_record()
            logger.log(final)
            progress.show_eval(final)
        summary = build_summary(
            cfg,
            preset=self.preset,
            steps=self.step,
            tokens=self.step * self._tokens_per_step,
            wall_time_s=wall,
            # this session's speed; a session that trained nothing: the run's
            tokens_per_s=(trained or self.step * self._tokens_per_step)
            / max(time.perf_counter() - start if trained else wall, 1e-9),
            final=final,
            last=record,
            sparsity_target=None if self.controller is None else self.controller.target,
            accounting=self.accounting,
            dataset=self.dataset,
            device=self.device,
        )
        if self.parallel.distributed:
            summary["distributed"] = self.parallel.layout()
        if main:
            skipped = sum(1 for r in self.rundir.read_metrics("train") if r.get("skipped"))
            if skipped:  # train.on_nonfinite=skip: how many steps made no update
                summary["skipped_steps"] = skipped
            self.rundir.write_summary(summary)
        return summary

    def _last_checkpoint(self) -> Path | None:
        """The checkpoint a resume would start from (None before the first one)."""
        return self.rundir.latest_checkpoint() if self.rundir.has_latest else None

    def _logged(self, kind: str) -> dict[str, Any] | None:
        """The metrics line of ``kind`` already logged at the current step, if any."""
        at_step = [r for r in self.rundir.read_metrics(kind) if r.get("step") == self.step]
        return at_step[-1] if at_step else None


class _NoLogger:
    """The metrics sink of ranks other than 0."""

    def log(self, record: dict[str, Any]) -> None:
        pass

    def close(self) -> None:
        pass


def _hide_warning(*args: Any, **kwargs: Any) -> None:
    """``warnings.showwarning`` of ranks other than 0 (rank 0 shows the run's warnings)."""
