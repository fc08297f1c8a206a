"""The training loop: one optimizer step = ``accumulation_steps`` micro-batches, then clip, step.

Ordering that matters (and is tested):

* Each micro-batch's loss (LM + weighted aux losses) is scaled by its share of the step's tokens, so
  a step's gradient is the same with or without gradient accumulation.
* ReMoE's :class:`~moelab.layers.SparsityController` *observes* after every micro-batch forward and
  *steps* once per optimizer step, after all micro-batches (PITFALLS: between-step controllers run
  at a named hook, never inside a forward). The λ used by a step's loss is the one from before it.
* Everything a resumed run needs (weights, optimizer, scheduler, controller, RNG, sampler position,
  elapsed time) is in the checkpoint, so on CPU a killed and resumed run logs the same numbers as
  an uninterrupted one.

Logging (``metrics.py``) and checkpointing (``checkpoint.py``) live in their own modules.
"""

from __future__ import annotations

import dataclasses
import json
import math
import random
import shutil
import signal
import threading
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from moelab.config import ConfigError, dump_yaml
from moelab.data import BatchSampler, TokenDataset, check_vocab_compatible, default_dataset_dir
from moelab.eval.perplexity import autocast_context, evaluate
from moelab.layers.base import RoutedLayer, RoutingStats, collect_aux_losses, fixed_aux_loss
from moelab.layers.sparsity import SparsityController
from moelab.model import TransformerLM, accounting
from moelab.train.checkpoint import clean_temporary, load_checkpoint, save_checkpoint
from moelab.train.config import RunConfig
from moelab.train.metrics import MetricsLogger, Progress, check_backends, truncate_metrics
from moelab.train.optim import build_optimizer, clip_grad_norm_
from moelab.train.schedule import build_scheduler

__all__ = ["Trainer", "build_controller", "open_dataset", "resolve_device", "train"]


# ------------------------------------------------------------------------------- set-up helpers


def open_dataset(config: RunConfig) -> TokenDataset:
    """The run's dataset (embedded corpus when ``data.path`` is null), checked against the model."""
    if config.data.path is None:
        path = default_dataset_dir()
    else:
        path = Path(config.data.path).expanduser()
        if not path.exists():
            raise ConfigError(
                "data.path",
                f"{str(path)!r} does not exist; expected a directory made by `moelab data "
                "prepare`, or null for the embedded corpus",
            )
    try:
        ds = TokenDataset(path)
    except ValueError as err:
        raise ConfigError("data.path", str(err)) from None
    check_vocab_compatible(ds, config.model.vocab_size)
    for split in ("train", "val"):
        n = ds.num_tokens(split)
        if n < config.data.seq_len + 1:
            raise ConfigError(
                "data.seq_len",
                f"{config.data.seq_len} needs at least {config.data.seq_len + 1} tokens, split "
                f"{split!r} of {ds.path} has {n}",
            )
    return ds


def resolve_device(config: RunConfig) -> torch.device:
    want = config.train.device
    if want == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device", "'cuda' requested but CUDA is not available; use cpu")
    if want == "auto":
        want = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(want)


def use_bf16(config: RunConfig, device: torch.device) -> bool:
    p = config.train.precision
    if p == "bf16" and device.type != "cuda":
        raise ConfigError("train.precision", "'bf16' autocast needs CUDA here; use fp32 or auto")
    return p == "bf16" or (p == "auto" and device.type == "cuda")


def build_controller(model: TransformerLM, config: RunConfig) -> SparsityController | None:
    """ReMoE's λ controller when any routed layer has a sparsity target (router="relu")."""
    targets = [
        t for layer in model.routed_layers() if (t := getattr(layer, "sparsity_target", None))
    ]
    if not targets:
        return None
    t = config.train
    return SparsityController(
        targets[0], lambda0=t.lambda0, alpha=t.lambda_alpha, per_layer=t.lambda_per_layer
    )


def routed_by_block(model: TransformerLM) -> dict[str, RoutedLayer]:
    """Routed layers keyed by their block index (the ``layers`` keys of metrics lines)."""
    return {
        str(i): block.ffn
        for i, block in enumerate(model.blocks)
        if isinstance(block.ffn, RoutedLayer)
    }


def merge_stats(a: RoutingStats | None, b: RoutingStats | None) -> RoutingStats | None:
    """Sum the counts of two forwards' statistics (micro-batches of one step)."""
    if a is None or b is None:
        return b if a is None else a
    out = dataclasses.replace(a, extra=dict(b.extra))
    for name in (
        "num_tokens",
        "tokens_per_expert",
        "router_nonzero",
        "router_total",
        "active_sum",
        "dropped",
        "assigned",
    ):
        x, y = getattr(a, name), getattr(b, name)
        setattr(out, name, None if x is None or y is None else x + y)
    if a.active_min is not None and b.active_min is not None:
        out.active_min = torch.minimum(a.active_min, b.active_min)
        out.active_max = torch.maximum(a.active_max, b.active_max)
    if a.distinct_experts is not None and b.distinct_experts is not None:
        out.distinct_experts = torch.maximum(a.distinct_experts, b.distinct_experts)
    return out


def _rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(_as_tuple(state["python"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _as_tuple(x: Any) -> Any:
    return tuple(_as_tuple(v) for v in x) if isinstance(x, list | tuple) else x


# ---------------------------------------------------------------------------------------- trainer


class Trainer:
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
        self.run_dir = Path(run_dir)
        self.preset = preset
        if not resume and (self.run_dir / "config.yaml").exists() and not overwrite:
            raise ConfigError(
                "run_dir",
                f"{str(self.run_dir)!r} already holds a run; continue it with --resume "
                f"{self.run_dir} or replace it with --overwrite",
            )
        replace = not resume and (self.run_dir / "config.yaml").exists()  # only after all checks
        if resume and not (self.run_dir / "config.yaml").is_file():
            raise ConfigError("resume", f"{str(self.run_dir)!r} holds no run (no config.yaml)")
        check_backends(config.logging)
        self.device = resolve_device(config)
        self.bf16 = use_bf16(config, self.device)
        if config.train.threads is not None:
            torch.set_num_threads(config.train.threads)
        self.dataset = open_dataset(config)

        torch.manual_seed(config.train.seed)
        random.seed(config.train.seed)
        self.model = TransformerLM(config.model).to(self.device)
        self.layers = routed_by_block(self.model)
        oc = config.optim
        self.optimizer = build_optimizer(
            self.model, oc.lr, oc.weight_decay, betas=(oc.beta1, oc.beta2), eps=oc.eps
        )
        self.scheduler = build_scheduler(
            self.optimizer, oc.warmup_steps, config.train.steps, oc.min_lr_ratio
        )
        self.controller = build_controller(self.model, config)
        self.sampler = BatchSampler(
            self.dataset, "train", config.data.seq_len, config.data.batch_size, config.data.seed
        )
        self.accounting = accounting(self.model)
        self._sampler_state = self.sampler.state_dict()  # as of the last completed step
        self.step = 0
        self.elapsed = 0.0  # training wall time of earlier processes of this run
        self._stop_requested = False
        if resume:
            self._restore()
        else:
            if replace:
                shutil.rmtree(self.run_dir)
            self._create_run_dir()

    # ---- run directory ------------------------------------------------------------------------

    def _create_run_dir(self) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        dump_yaml(self.config, self.run_dir / "config.yaml")
        tok = self.dataset.path / self.dataset.meta.get("tokenizer_file", "tokenizer.json")
        if tok.is_file():
            shutil.copyfile(tok, self.run_dir / "tokenizer.json")
        (self.run_dir / "accounting.json").write_text(json.dumps(self.accounting, indent=2))

    def _restore(self) -> None:
        clean_temporary(self.run_dir)
        from moelab.eval.run import check_same_tokenizer

        check_same_tokenizer(self.run_dir, self.dataset, field="data.path")
        dump_yaml(self.config, self.run_dir / "config.yaml")  # overrides given on resume
        ckpt, state = load_checkpoint(self.run_dir, self.model)
        try:
            self.optimizer.load_state_dict(state["optimizer"])
            self.scheduler.load_state_dict(state["scheduler"])
            self._refresh_schedule()  # train.steps / optim.* may be changed on resume
            if self.controller is not None:
                self.controller.load_state_dict(state["controller"])
            self.sampler.load_state_dict(state["sampler"])
            self._sampler_state = self.sampler.state_dict()
            _set_rng_state(state["rng"])
            self.step = int(state["step"])
            self.elapsed = float(state.get("elapsed", 0.0))
        except (KeyError, ValueError, RuntimeError) as err:
            raise ConfigError("resume", f"{ckpt}/state.pt does not fit this run: {err}") from None
        truncate_metrics(self.run_dir, self.step)

    def _refresh_schedule(self) -> None:
        """Point the restored scheduler at this config's schedule and set the current lr from it."""
        oc = self.config.optim
        fn = self.scheduler.lr_lambdas[0]
        fn.warmup_steps, fn.total_steps = oc.warmup_steps, self.config.train.steps
        fn.min_lr_ratio = oc.min_lr_ratio
        self.scheduler.base_lrs = [oc.lr for _ in self.optimizer.param_groups]
        for group in self.optimizer.param_groups:
            group["initial_lr"] = oc.lr
            group["lr"] = oc.lr * fn(self.scheduler.last_epoch)

    def save(self) -> Path:
        state = {
            "step": self.step,
            "elapsed": self.elapsed,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "controller": None if self.controller is None else self.controller.state_dict(),
            "sampler": self._sampler_state,
            "rng": _rng_state(),
        }
        return save_checkpoint(
            self.run_dir, self.step, self.model, state, self.config.checkpoint.keep_last
        )

    # ---- one optimizer step ---------------------------------------------------------------------

    def train_step(self) -> dict[str, Any]:
        """One optimizer step on the sampler's next batch; returns the step's metrics record."""
        x, y = self.sampler.next_batch()
        lr = self.optimizer.param_groups[0]["lr"]
        lam = None if self.controller is None else self.controller.lam
        record = self.accumulate_gradients(x, y)
        clip = self.config.optim.grad_clip
        grad_norm = float(clip_grad_norm_(self.model.parameters(), clip or math.inf))
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        sparsity = None if self.controller is None else self.controller.step()
        self.step += 1
        self._sampler_state = self.sampler.state_dict()
        out: dict[str, Any] = {
            "kind": "train",
            "step": self.step,
            "tokens": self.step * y.numel(),
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
        return out

    def accumulate_gradients(self, x: torch.Tensor, y: torch.Tensor) -> dict[str, Any]:
        """Forward/backward the batch ``(x, y)`` in ``data.accumulation_steps`` micro-batches.

        Each micro-batch's loss is weighted by its share of the batch's tokens, so the summed
        gradient equals the full batch's (exactly for the LM loss and token-linear aux losses).
        The λ controller observes every micro-batch; it is *not* stepped here.
        """
        n_micro = self.config.data.accumulation_steps
        total_tokens = y.numel()
        lm_sum = 0.0
        aux_sum: dict[str, float] = {}
        stats: dict[str, RoutingStats | None] = dict.fromkeys(self.layers)
        self.model.train()
        for xb, yb in zip(x.chunk(n_micro), y.chunk(n_micro), strict=True):
            share = yb.numel() / total_tokens
            xb, yb = xb.to(self.device), yb.to(self.device)
            with autocast_context(self.device, self.bf16):
                logits = self.model(xb)
            lm = F.cross_entropy(logits.float().flatten(0, 1), yb.flatten())
            aux = collect_aux_losses(self.layers.values())
            if self.controller is not None:
                self.controller.observe(self.layers.values())
            loss = lm
            fixed = fixed_aux_loss(self.layers.values())
            if fixed is not None:
                loss = loss + fixed
            if self.controller is not None:
                penalty = self.controller.penalty(self.layers.values())  # ReMoE's λ-weighted L1
                loss = loss if penalty is None else loss + penalty
            (loss * share).backward()
            lm_sum += float(lm.detach()) * share
            for name, value in aux.items():
                aux_sum[name] = aux_sum.get(name, 0.0) + float(value.detach()) * share
            for key, layer in self.layers.items():
                stats[key] = merge_stats(stats[key], layer.last_stats)
        layers = {k: st.as_dict() for k, st in stats.items() if st is not None}
        return {"loss": lm_sum, "aux": aux_sum, "layers": layers}

    # ---- evaluation -----------------------------------------------------------------------------

    def evaluate(self) -> dict[str, Any]:
        d = self.config.data
        return evaluate(
            self.model,
            self.dataset,
            d.seq_len,
            d.eval_batch_size,
            d.eval_max_batches,
            bf16=self.bf16,
        )

    # ---- the loop -------------------------------------------------------------------------------

    def run(self, stop_after: int | None = None) -> dict[str, Any]:
        """Train to ``train.steps`` (or stop, checkpointed, after step ``stop_after``: what Ctrl-C
        does); returns the summary (``interrupted`` tells which)."""
        cfg = self.config
        total = cfg.train.steps
        logger = MetricsLogger(self.run_dir, cfg)
        progress = Progress(total, self.step, cfg.logging.progress, f"{cfg.method}")
        handler = self._install_sigint()
        start, tokens_at_start = time.perf_counter(), self.step * self._tokens_per_step
        last_t, last_step = start, self.step
        last_saved = self.step if self.step > 0 else -1
        interrupted = False
        record: dict[str, Any] = {}
        try:
            while self.step < total:
                record = self.train_step()
                now = time.perf_counter()
                tps = (self.step - last_step) * self._tokens_per_step / max(now - last_t, 1e-9)
                record["tokens_per_s"] = tps
                progress.update(
                    record["loss"], tps, record.get("sparsity"), record.get("lambda_next")
                )
                if self.step % cfg.logging.log_every == 0 or self.step == total:
                    logger.log(record)
                    last_t, last_step = now, self.step
                if (
                    cfg.train.eval_every
                    and self.step % cfg.train.eval_every == 0
                    and self.step < total
                ):
                    logger.log(self._eval_record())
                    last_t, last_step = time.perf_counter(), self.step  # tokens/s: training only
                stop = self._stop_requested or (stop_after is not None and self.step >= stop_after)
                every = cfg.checkpoint.every
                if (every and self.step % every == 0) or self.step == total or stop:
                    self._save_with_elapsed(start)
                    last_saved = self.step
                    last_t, last_step = time.perf_counter(), self.step
                if stop and self.step < total:
                    interrupted = True
                    break
        except KeyboardInterrupt:  # a second Ctrl-C, or one outside the main thread's handler
            interrupted = True
            if last_saved != self.step:
                self._save_with_elapsed(start)
        finally:
            self._restore_sigint(handler)
            progress.close()
        wall = self.elapsed + (time.perf_counter() - start)
        if interrupted:
            logger.close()
            print(
                f"stopped at step {self.step}; checkpoint saved. Continue with: "
                f"moelab train --resume {self.run_dir}"
            )
            return {"interrupted": True, "steps": self.step, "run_dir": str(self.run_dir)}
        final = self._eval_record()
        logger.log(final)
        logger.close()
        trained = self.step * self._tokens_per_step - tokens_at_start
        summary = self._summary(
            final, record, wall, trained / max(time.perf_counter() - start, 1e-9)
        )
        (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        return summary

    @property
    def _tokens_per_step(self) -> int:
        return self.config.data.batch_size * self.config.data.seq_len

    def _save_with_elapsed(self, start: float) -> None:
        saved_elapsed = self.elapsed
        self.elapsed = saved_elapsed + (time.perf_counter() - start)
        try:
            self.save()
        finally:
            self.elapsed = saved_elapsed

    def _eval_record(self) -> dict[str, Any]:
        ev = self.evaluate()
        return {
            "kind": "eval",
            "step": self.step,
            "tokens": self.step * self._tokens_per_step,
            "val_loss": ev["val_loss"],
            "val_ppl": ev["val_ppl"],
            "val_loss_by_domain": ev["val_loss_by_domain"],
            "val_tokens": ev["tokens"],
        }

    def _summary(
        self, final: dict[str, Any], last: dict[str, Any], wall: float, tokens_per_s: float
    ) -> dict[str, Any]:
        acc = self.accounting
        meta = self.dataset.meta
        return {
            "method": self.config.method,
            "preset": self.preset,
            "steps": self.step,
            "tokens": self.step * self._tokens_per_step,
            "wall_time_s": wall,
            "tokens_per_s": tokens_per_s,
            "final_train_loss": last.get("loss"),
            "final_val_loss": final["val_loss"],
            "final_val_ppl": final["val_ppl"],
            "val_loss_by_domain": final["val_loss_by_domain"],
            "val_tokens": final["val_tokens"],
            "unigram_entropy": meta.get("unigram_entropy_nats", {}),
            "final_sparsity": last.get("sparsity"),
            "sparsity_target": None if self.controller is None else self.controller.target,
            "final_lambda": last.get("lambda_next"),
            "params": {
                "total_params": acc["total_params"],
                "active_params": acc["active_params"],
                "flops_per_token": acc["flops_per_token"],
            },
            "device": str(self.device),
            "dataset": str(self.dataset.path),
        }

    # ---- Ctrl-C ---------------------------------------------------------------------------------

    def _install_sigint(self) -> Any:
        """First Ctrl-C: finish the current step, checkpoint, stop. Second: stop right away."""
        if threading.current_thread() is not threading.main_thread():
            return None

        def on_sigint(signum: int, frame: Any) -> None:
            if self._stop_requested:
                raise KeyboardInterrupt
            self._stop_requested = True
            print("\nCtrl-C: finishing this step and saving a checkpoint (again to abort)")

        return signal.signal(signal.SIGINT, on_sigint)

    @staticmethod
    def _restore_sigint(previous: Any) -> None:
        if previous is not None:
            signal.signal(signal.SIGINT, previous)


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
    return trainer.run(stop_after=stop_after)
