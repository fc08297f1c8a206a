"""Saving and restoring a run's training state: what a checkpoint holds beside the weights.

A checkpoint holds, besides the weights, everything a resumed run needs to log the same numbers as
an uninterrupted one: the step, the training time so far, the optimizer and scheduler, every
between-step hook (the λ controller, router state hooks; each under its own name), the sampler's
position and every RNG stream.
"""

from __future__ import annotations

import time
from pathlib import Path

from moelab.config import ConfigError
from moelab.distributed import load_checkpoint, save_checkpoint
from moelab.rundir import RunDir
from moelab.train.rng import restore_rng, rng_state


class CheckpointedTraining:
    """The checkpoint half of :class:`~moelab.train.trainer.Trainer` (a mixin: it reads the
    trainer's ``rundir``, ``model``, ``optimizer``, ``scheduler``, ``step_hooks``, ``sampler``,
    ``parallel`` and ``config``, and sets ``step`` and ``elapsed``)."""

    def _restore(self) -> None:
        """Load the latest checkpoint into the model, optimizer, scheduler, between-step hooks,
        sampler and RNG; reads the run directory, writes nothing."""
        run = self.rundir
        run.check_same_tokenizer(self.dataset, field="data.path")
        if self.parallel.distributed or run.is_sharded(run.latest_checkpoint()):
            ckpt, state = load_checkpoint(run, self.model, self.optimizer, self.parallel)
        else:
            ckpt, state = run.load_checkpoint(self.model)
        try:
            if "optimizer" in state:  # a sharded checkpoint's is loaded already
                self.optimizer.load_state_dict(state["optimizer"])
            self.scheduler.load_state_dict(state["scheduler"])
            oc, steps = self.config.optim, self.config.train.steps  # may be changed on resume
            self.scheduler.retarget(oc.lr, oc.warmup_steps, steps, oc.min_lr_ratio)
            for name, hook in self.step_hooks.items():
                hook.load_state_dict(state[name])
            self.sampler.load_state_dict(state["sampler"])
            self._sampler_state = self.sampler.state_dict()
            p = self.parallel
            restore_rng(state, p.rank, p.world_size, str(ckpt / RunDir.STATE))
            self.step = int(state["step"])
            self.elapsed = float(state.get("elapsed", 0.0))
            self.flops_total = float(state.get("flops_total", 0.0))  # older checkpoints: 0
        except (KeyError, ValueError, RuntimeError) as err:
            raise ConfigError(
                "resume", f"{ckpt / RunDir.STATE} does not fit this run: {err}"
            ) from None
        if self.step > steps:
            raise ConfigError(
                "train.steps",
                f"the run is at step {self.step}, past the {steps} asked for; give "
                f"train.steps >= {self.step}",
            )

    def save(self) -> Path:
        """Write a checkpoint of the current step atomically; returns its directory."""
        state = {
            "step": self.step,
            "elapsed": self.elapsed,
            "flops_total": self.flops_total,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            **{name: hook.state_dict() for name, hook in self.step_hooks.items()},
            "sampler": self._sampler_state,
            "rng": rng_state(),
        }
        if self.parallel.distributed:  # each rank's own streams (a collective: every rank)
            state["rng_by_rank"] = self.parallel.gather_objects(state["rng"])
        if self.parallel.distributed:  # every rank writes its shards (optimizer included)
            self.parallel.sync_buffers(self.model)
            del state["optimizer"]
            return save_checkpoint(
                self.rundir,
                self.step,
                self.model,
                self.optimizer,
                state,
                self.config.checkpoint.keep_last,
                self.parallel,
            )
        return self.rundir.save_checkpoint(
            self.step, self.model, state, self.config.checkpoint.keep_last
        )

    def _save_with_elapsed(self, start: float) -> None:
        """Save with ``elapsed`` counting this process's time since ``start``."""
        saved_elapsed = self.elapsed
        self.elapsed = saved_elapsed + (time.perf_counter() - start)
        try:
            self.save()
        finally:
            self.elapsed = saved_elapsed
