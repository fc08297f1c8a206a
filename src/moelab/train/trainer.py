"""The training loop: one optimizer step = ``accumulation_steps`` micro-batches, then clip, step.

Ordering that matters (and is tested):

* Each micro-batch's loss (LM + weighted aux losses) is scaled by its share of the step's tokens, so
  a step's gradient is the same with or without gradient accumulation.
* The between-step hooks - ReMoE's :class:`~moelab.layers.SparsityController` and the
  :class:`~moelab.layers.RouterLoadHook` of routers with state (aux-loss-free balancing) -
  *observe* after every micro-batch forward and *step* once per optimizer step, after all
  micro-batches: λ and router state change between steps at this one named point, never inside a
  forward, so every micro-batch of a step routes the same way. The λ used by a step's loss is the
  one from before it.
* Everything a resumed run needs (weights, optimizer, scheduler, controller, RNG, sampler position,
  elapsed time) is in the checkpoint, so on CPU a killed and resumed run logs the same numbers as
  an uninterrupted one.

Set-up (``setup.py``), the run directory (:class:`~moelab.rundir.RunDir`), logging
(``metrics.py``), eval lines and the summary (``records.py``), Ctrl-C (``signals.py``) and the
parallelism of a ``torchrun`` launch (:mod:`moelab.distributed`: ``self.parallel``, which changes
nothing in one process) live elsewhere, so this file is the step and the loop. Under ``torchrun``
every rank runs this loop on its shard of each batch; rank 0 alone writes the run directory
(metrics, summary, provenance) and shows progress, and every rank writes its shards of each
checkpoint.
"""

from __future__ import annotations

import math
import random
import time
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from moelab import provenance
from moelab.config import ConfigError
from moelab.data import BatchSampler, dataset_checksum
from moelab.distributed import setup_parallel
from moelab.eval.perplexity import autocast_context, evaluate
from moelab.layers.base import RoutedLayer, RoutingStats, collect_aux_losses, fixed_aux_loss
from moelab.layers.router_load_hook import RouterLoadHook
from moelab.layers.sparsity_controller import SparsityController
from moelab.model import TransformerLM, accounting
from moelab.rundir import RunDir
from moelab.train.checkpointing import CheckpointedTraining
from moelab.train.config import RunConfig
from moelab.train.metrics import MetricsLogger, Progress, check_backends
from moelab.train.optim import build_optimizer, clip_grad_norm_
from moelab.train.records import build_summary, eval_record
from moelab.train.schedule import build_scheduler
from moelab.train.setup import (
    build_controller,
    check_resume_config,
    open_dataset,
    resolve_device,
    routed_by_block,
    use_bf16,
)
from moelab.train.signals import StopOnCtrlC

__all__ = ["Trainer", "aux_loss", "train"]


def aux_loss(
    layers: Iterable[RoutedLayer], controller: SparsityController | None
) -> Tensor | float:
    """What the routed layers add to the LM loss: their fixed-coefficient aux losses and, with a
    λ controller, its penalty on their controlled loss (ReMoE's λ·L1), each summed over layers."""
    layers = list(layers)
    fixed = fixed_aux_loss(layers)
    penalty = None if controller is None else controller.penalty(layers)
    total: Tensor | float = 0.0 if fixed is None else fixed
    return total if penalty is None else total + penalty


class Trainer(CheckpointedTraining):
    """Builds everything a run needs from a :class:`RunConfig`, then :meth:`run` trains it.

    All checks (config, data path, vocabulary, logging backends, device) happen in ``__init__``,
    before the first step. ``resume=True`` continues the run in ``run_dir`` from its latest
    checkpoint; otherwise ``run_dir`` must not hold a run (unless ``overwrite``).
    """

    def __init__(
        self,
        config: RunConfig,
        run_dir: str | Path,
        *,
        resume: bool = False,
        overwrite: bool = False,
        preset: str | None = None,
    ) -> None:
        self.config = config
        self.rundir = RunDir(run_dir)
        self.run_dir = self.rundir.path
        if not resume and self.rundir.holds_run and not overwrite:
            raise ConfigError(
                "run_dir",
                f"{str(self.run_dir)!r} already holds a run; continue it with --resume "
                f"{self.run_dir} or replace it with --overwrite",
            )
        replace = not resume and self.rundir.holds_run  # only after all checks
        if resume and not self.rundir.holds_run:
            raise ConfigError("resume", f"{str(self.run_dir)!r} holds no run (no {RunDir.CONFIG})")
        if resume:  # before anything else: a refused override must leave the run untouched
            check_resume_config(self.rundir.read_config(RunConfig), config)
            preset = preset or self.rundir.recorded_preset()
        self.preset = preset
        check_backends(config.logging)
        device = resolve_device(config)
        self.parallel = setup_parallel(config, device)  # one process: changes nothing
        self.device = self.parallel.place(device)
        self.bf16 = use_bf16(config, self.device)
        if config.train.threads is not None:
            torch.set_num_threads(config.train.threads)
        self.dataset = open_dataset(config)

        torch.manual_seed(config.train.seed)
        random.seed(config.train.seed)
        self.model = TransformerLM(config.model).to(self.device)
        self.accounting = accounting(self.model)  # the whole model, before any sharding
        self.layers = routed_by_block(self.model)
        self.train_model = self.parallel.parallelize(self.model)  # one process: the model
        oc = config.optim
        self.optimizer = build_optimizer(
            self.model,
            oc.lr,
            oc.weight_decay,
            betas=(oc.beta1, oc.beta2),
            eps=oc.eps,
            table_optimizer=oc.table_optimizer,
        )
        self.scheduler = build_scheduler(
            self.optimizer, oc.warmup_steps, config.train.steps, oc.min_lr_ratio
        )
        self.controller = build_controller(self.model, config)
        load_hook = RouterLoadHook.for_layers(self.layers.values())
        # Between-step hooks by name (the name is also their key in checkpoints).
        self.step_hooks: dict[str, SparsityController | RouterLoadHook] = {
            name: hook
            for name, hook in (("controller", self.controller), (RouterLoadHook.name, load_hook))
            if hook is not None
        }
        self.parallel.connect(*self.step_hooks.values())  # they sum their counts over ranks
        self.sampler = BatchSampler(
            self.dataset,
            "train",
            config.data.seq_len,
            config.data.batch_size,
            config.data.seed,
            shard=self.parallel.sampler_shard(),
        )
        self._sampler_state = self.sampler.state_dict()  # as of the last completed step
        self.step = 0
        self.elapsed = 0.0  # training wall time of earlier processes of this run
        self.complete = False  # resumed a run that already reached train.steps: nothing to do
        if resume:
            self._restore()
            self.complete = self.step >= config.train.steps and (
                self.rundir.read_summary().get("steps") == self.step
            )
            if self.complete:
                return  # the run stays exactly as it is
        self.parallel.barrier()  # every rank has checked and read the run directory
        if not self.parallel.is_main:
            return
        if resume:  # every check passed: only now does the run directory change
            self.rundir.clean_temporary()
            self.rundir.remove_summary()  # the run continues: it is not complete any more
            self.rundir.write_config(config)  # overrides given on resume
            self.rundir.truncate_metrics(self.step)
        else:
            self.rundir.create(config, self.dataset, self.accounting, replace=replace)
        data_sha256 = dataset_checksum(self.dataset.path)  # cached: hashed once per dataset
        record = provenance.collect(self.device, self.dataset.path, data_sha256)
        record |= {"start_step": self.step, "preset": self.preset}
        if self.parallel.distributed:
            record["distributed"] = self.parallel.layout()
        self.rundir.add_provenance(record)

    # ---- one optimizer step ---------------------------------------------------------------------

    def train_step(self) -> dict[str, Any]:
        """One optimizer step on the sampler's next batch; returns the step's metrics record."""
        x, y = self.sampler.next_batch()
        lr = self.optimizer.param_groups[0]["lr"]
        lam = None if self.controller is None else self.controller.lam
        record = self.accumulate_gradients(x, y)
        self.parallel.finish_gradients(self.model)
        clip = self.config.optim.grad_clip
        grad_norm = self.parallel.clip_grad_norm_(self.model, clip or math.inf, clip_grad_norm_)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        stepped = {name: hook.step() for name, hook in self.step_hooks.items()}
        sparsity = stepped.get("controller")
        self.step += 1
        self._sampler_state = self.sampler.state_dict()
        out: dict[str, Any] = {
            "kind": "train",
            "step": self.step,
            "tokens": self.step * self._tokens_per_step,
            "lr": lr,
            "loss": record["loss"],
            "aux": record["aux"],
            "grad_norm": grad_norm,
        }
        if self.controller is not None:
            out["lambda"] = lam  # the λ this step's loss used
            out["lambda_next"] = self.controller.lam
            if self.controller.per_layer:
                out["lambda_layers"] = list(self.controller.layer_lams)
            out["sparsity"] = sparsity
        out["layers"] = record["layers"]
        out.update(self.parallel.step_report())  # e.g. the all-to-all time of expert parallelism
        return out

    def accumulate_gradients(self, x: torch.Tensor, y: torch.Tensor) -> dict[str, Any]:
        """Forward/backward the batch ``(x, y)`` (this rank's part of the step's batch) in
        micro-batches of ``data.micro_batch_size``.

        Each micro-batch's loss is weighted by its share of the batch's tokens, so the summed
        gradient equals the full batch's (exactly for the LM loss and token-linear aux losses).
        The λ controller observes every micro-batch; it is *not* stepped here. Under ``torchrun``
        gradients are reduced across ranks in the last micro-batch, and the returned loss, aux
        losses and statistics are those of all ranks.
        """
        d = self.config.data
        n_micro = self.parallel.micro_batches(d.batch_size, d.micro_batch_size)
        total_tokens = y.numel()
        lm_sum = 0.0
        aux_sum: dict[str, float] = {}
        stats: dict[str, RoutingStats | None] = dict.fromkeys(self.layers)
        self.model.train()
        for i, (xb, yb) in enumerate(zip(x.chunk(n_micro), y.chunk(n_micro), strict=True)):
            share = yb.numel() / total_tokens
            xb, yb = xb.to(self.device), yb.to(self.device)
            with self.parallel.sync_gradients(last=i == n_micro - 1):
                with autocast_context(self.device, self.bf16):
                    logits = self.train_model(xb)
                lm = F.cross_entropy(logits.float().flatten(0, 1), yb.flatten())
                aux = collect_aux_losses(self.layers.values())
                for hook in self.step_hooks.values():
                    hook.observe(self.layers.values())
                loss = lm + aux_loss(self.layers.values(), self.controller)
                (loss * share).backward()
            lm_sum += float(lm.detach()) * share
            for name, value in aux.items():
                aux_sum[name] = aux_sum.get(name, 0.0) + float(value.detach()) * share
            for key, layer in self.layers.items():
                so_far = stats[key]
                stats[key] = layer.last_stats if so_far is None else so_far.merge(layer.last_stats)
        lm_sum, aux_sum, stats = self.parallel.reduce_step(lm_sum, aux_sum, stats)
        layers = {k: st.as_dict() for k, st in stats.items() if st is not None}
        return {"loss": lm_sum, "aux": aux_sum, "layers": layers}

    # ---- evaluation -----------------------------------------------------------------------------

    def evaluate(self) -> dict[str, Any]:
        """Validation loss; under ``torchrun`` the ranks share the batches (each scores every
        world-size-th one, the sums are added over ranks) and rank 0 logs it."""
        d = self.config.data
        self.parallel.sync_buffers(self.model)
        return evaluate(
            self.model,
            self.dataset,
            d.seq_len,
            d.eval_batch_size,
            d.eval_max_batches,
            bf16=self.bf16,
            shard=(self.parallel.rank, self.parallel.world_size),
            all_sum=self.parallel.all_sum,
        )

    def _eval_record(self) -> dict[str, Any]:
        return eval_record(self.step, self.step * self._tokens_per_step, self.evaluate())

    # ---- the loop -------------------------------------------------------------------------------

    def run(self, stop_after: int | None = None) -> dict[str, Any]:
        """Train to ``train.steps`` (or stop, checkpointed, after step ``stop_after``: what Ctrl-C
        does); returns the summary (``interrupted`` tells which). A run that was already complete
        (:attr:`complete`) is left as it is and its summary returned."""
        if self.complete:
            return self.rundir.read_summary()
        cfg = self.config
        total = cfg.train.steps
        main = self.parallel.is_main  # the only rank that writes files and shows progress
        logger = MetricsLogger(self.rundir, cfg) if main else _NoLogger()
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
                    now = time.perf_counter()
                    tps = (self.step - last_step) * self._tokens_per_step / max(now - last_t, 1e-9)
                    record["tokens_per_s"] = tps
                    progress.update(record)
                    if self.step % cfg.logging.log_every == 0 or self.step == total:
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
            logger.close()
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
        logger.close()
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
            self.rundir.write_summary(summary)
        return summary

    def close(self) -> None:
        """End the process group this trainer started (a ``torchrun`` launch; else nothing)."""
        self.parallel.close()

    def _logged(self, kind: str) -> dict[str, Any] | None:
        """The metrics line of ``kind`` already logged at the current step, if any."""
        at_step = [r for r in self.rundir.read_metrics(kind) if r.get("step") == self.step]
        return at_step[-1] if at_step else None

    @property
    def _tokens_per_step(self) -> int:
        return self.config.data.batch_size * self.config.data.seq_len


def train(
    config: RunConfig,
    run_dir: str | Path,
    *,
    resume: bool = False,
    overwrite: bool = False,
    preset: str | None = None,
    stop_after: int | None = None,
) -> dict[str, Any]:
    """Train ``config`` into ``run_dir`` (see :class:`Trainer`); returns the summary dict."""
    trainer = Trainer(config, run_dir, resume=resume, overwrite=overwrite, preset=preset)
    summary = trainer.run(stop_after=stop_after)
    trainer.close()
    return summary


class _NoLogger:
    """The metrics sink of ranks other than 0."""

    def log(self, record: dict[str, Any]) -> None:
        pass

    def close(self) -> None:
        pass


def _hide_warning(*args: Any, **kwargs: Any) -> None:
    """``warnings.showwarning`` of ranks other than 0 (rank 0 shows the run's warnings)."""
