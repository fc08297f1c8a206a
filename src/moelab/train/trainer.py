"""The trainer: a run built from its config, and one optimizer step (``accumulation_steps``
micro-batches, then clip, step).

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
* A step whose loss or gradient norm is not finite is never applied (``divergence.py``;
  ``train.on_nonfinite`` says whether the run stops or skips it).
* One process writes a run directory at a time: the trainer holds its lock
  (:meth:`~moelab.rundir.RunDir.lock`) from construction to the end of :meth:`run` (or
  :meth:`close`), and a new run goes only where :meth:`~moelab.rundir.RunDir.check_new_run`
  allows (new, empty, or an earlier run with ``overwrite``).

Set-up (``setup.py``), the run directory (:class:`~moelab.rundir.RunDir`), the loop
(``loop.py``), logging (``metrics.py``), eval lines and the summary (``records.py``), Ctrl-C
(``signals.py``) and the parallelism of a ``torchrun`` launch (:mod:`moelab.distributed`:
``self.parallel``, which changes nothing in one process) live elsewhere, so this file is the
construction and the step. Under ``torchrun`` every rank runs the loop on its shard of each
batch; rank 0 alone writes the run directory (metrics, summary, provenance), holds its lock and
shows progress, and every rank writes its shards of each checkpoint.
"""

from __future__ import annotations

import contextlib
import math
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
from moelab.model import TransformerLM, accounting, measured_flops
from moelab.rundir import DirectoryLock, RunDir
from moelab.train.checkpointing import CheckpointedTraining
from moelab.train.config import RunConfig
from moelab.train.divergence import is_finite_step
from moelab.train.loop import TrainingLoop
from moelab.train.metrics import check_backends
from moelab.train.optim import build_optimizer, clip_grad_norm_
from moelab.train.records import eval_record
from moelab.train.rng import seed_everything
from moelab.train.schedule import build_scheduler
from moelab.train.setup import (
    build_controller,
    check_resume_config,
    check_trainable,
    open_dataset,
    resolve_device,
    routed_by_block,
    use_bf16,
)

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


class Trainer(CheckpointedTraining, TrainingLoop):
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
        self._lock: DirectoryLock | None = None
        self._made_dir = False  # this trainer created the run directory
        if resume:  # before anything else: a refused override must leave the run untouched
            if not self.rundir.holds_run:
                raise ConfigError(
                    "resume", f"{str(self.run_dir)!r} holds no run (no {RunDir.CONFIG})"
                )
            check_resume_config(self.rundir.read_config(RunConfig), config)
            preset = preset or self.rundir.recorded_preset()
        else:  # a dataset, other files, or a run without overwrite: refused, nothing touched
            self.rundir.check_new_run(overwrite=overwrite)
        self.preset = preset
        check_backends(config.logging)
        device = resolve_device(config)
        self.parallel = setup_parallel(config, device)  # one process: changes nothing
        replace = False
        if self.parallel.is_main:  # the one writer of the run directory, until run() ends
            replace = self._hold_run_dir(resume, overwrite)
        try:
            self._build(config, device, resume=resume, replace=replace)
        except BaseException:
            self.release_run_dir()
            raise

    def _hold_run_dir(self, resume: bool, overwrite: bool) -> bool:
        """Lock the run directory (a second writer is refused with this process's pid) and,
        for a new run, check it again now that no other process can change it; returns whether
        an earlier run is to be replaced."""
        self._made_dir = not self.run_dir.exists()
        self._lock = self.rundir.lock()
        if resume:
            return False
        try:
            return self.rundir.check_new_run(overwrite=overwrite)
        except BaseException:
            self.release_run_dir()
            raise

    def release_run_dir(self) -> None:
        """Give the run directory's lock up (the end of :meth:`run` and :meth:`close` do); a
        directory this trainer created and left empty (a failed start) is removed."""
        if self._lock is None:
            return
        self._lock.release()
        self._lock = None
        if self._made_dir:
            with contextlib.suppress(OSError):  # not empty: the run is there
                self.run_dir.rmdir()

    def _build(
        self, config: RunConfig, device: torch.device, *, resume: bool, replace: bool
    ) -> None:
        """Everything else a run needs; on the main process, lays out (or continues) the run
        directory once every check passed."""
        self.device = self.parallel.place(device)
        self.bf16 = use_bf16(config, self.device)
        if config.train.threads is not None:
            torch.set_num_threads(config.train.threads)
        self.dataset = open_dataset(config)

        seed_everything(config.train.seed)
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
        self.flops_total = 0.0  # measured forward FLOPs of every training step so far
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
        """One optimizer step on the sampler's next batch; returns the step's metrics record.

        A step whose loss or gradient norm is not finite changes no weight, optimizer state or
        between-step hook (their observations of it are dropped) and is marked ``nonfinite``;
        with ``train.on_nonfinite=skip`` it still counts as a step (``skipped``), else nothing of
        it is kept (the loop then stops, see ``divergence.py``)."""
        x, y = self.sampler.next_batch()
        lr = self.optimizer.param_groups[0]["lr"]
        lam = None if self.controller is None else self.controller.lam
        record = self.accumulate_gradients(x, y)
        self.parallel.finish_gradients(self.model)
        clip = self.config.optim.grad_clip
        grad_norm = self.parallel.clip_grad_norm_(self.model, clip or math.inf, clip_grad_norm_)
        finite = is_finite_step(record["loss"], grad_norm)  # the same on every rank (reduced)
        if finite:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if finite:
            stepped = {name: hook.step() for name, hook in self.step_hooks.items()}
        else:
            stepped = {}
            for hook in self.step_hooks.values():  # reloading its own state drops what it saw
                hook.load_state_dict(hook.state_dict())
        step = self.step + 1
        step_flops = self._step_flops(record["layers"])
        out: dict[str, Any] = {
            "kind": "train",
            "step": step,
            "tokens": step * self._tokens_per_step,
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
            out["sparsity"] = stepped.get("controller")
        out["layers"] = record["layers"]
        out["flops"] = {"step": step_flops, "per_token": step_flops / self._tokens_per_step}
        out["flops_total"] = self.flops_total + step_flops
        out.update(self.parallel.step_report())  # e.g. the all-to-all time of expert parallelism
        if not finite:
            out["nonfinite"] = True
            if self.config.train.on_nonfinite != "skip":
                return out  # not a step: the run stops at it
            out["skipped"] = True
        self.scheduler.step()
        self.step = step
        self.flops_total = out["flops_total"]  # a skipped step's forward still ran
        self._sampler_state = self.sampler.state_dict()
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

    def _step_flops(self, layers: dict[str, dict[str, Any]]) -> float:
        """Measured forward FLOPs of the step's training tokens: the routing-independent part
        of the accounting per token, plus the expert FLOPs the routed layers recorded (summed
        over micro-batches and ranks; evaluation forwards record none)."""
        spent = sum(float(st.get("expert_flops", 0.0)) for st in layers.values())
        return measured_flops(self.accounting, self._tokens_per_step, spent)

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

    def close(self) -> None:
        """Release the run directory and end the process group this trainer started (a
        ``torchrun`` launch; else nothing)."""
        self.release_run_dir()
        self.parallel.close()

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
    """Train ``config`` into ``run_dir`` (see :class:`Trainer`); returns the summary dict.
    A model that cannot train (quantized experts) is refused before anything is touched."""
    check_trainable(config)
    trainer = Trainer(config, run_dir, resume=resume, overwrite=overwrite, preset=preset)
    try:
        return trainer.run(stop_after=stop_after)
    finally:  # also on an error: the lock, and the process group of a torchrun launch
        trainer.close()
