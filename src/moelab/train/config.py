"""The typed configuration of a training run (:class:`RunConfig`) and the shipped presets.

A run is fully described by one YAML file with seven sections (``model``, ``data``, ``optim``,
``train``, ``logging``, ``checkpoint``, ``distributed``); presets under ``moelab/configs/*.yaml``
are such files and the command line only applies dotted overrides (``model.ffn.top_k=2``,
``train.steps=100``). Everything that can be checked without touching the data is checked when
the config is built, so a mistake stops the run before any work with one message naming the
field.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable
from dataclasses import field
from importlib import resources
from pathlib import Path
from typing import Literal

from moelab.config import Config, ConfigError, check, load_config
from moelab.distributed.config import DistributedConfig
from moelab.layers.sparsity_controller import LAMBDA_MAX, LAMBDA_MIN
from moelab.model import ModelConfig

__all__ = [
    "DEFAULT_PRESET",
    "CheckpointConfig",
    "DataConfig",
    "DistributedConfig",
    "LoggingConfig",
    "OptimConfig",
    "RunConfig",
    "TrainConfig",
    "list_presets",
    "method_name",
    "preset_path",
    "resolve_run_config",
]

DEFAULT_PRESET = "remoe-tiny"


@dataclasses.dataclass(kw_only=True)
class DataConfig(Config):
    """Where tokens come from and how they are batched.

    ``batch_size`` is the number of sequences per optimizer step (over all ranks of a
    ``torchrun`` launch: each trains ``batch_size / ranks``); ``micro_batch_size`` (None = the
    whole batch of a rank) splits a rank's batch for gradient accumulation without changing the
    step's gradient.
    """

    path: str | None = None  # a `moelab data prepare` directory; None: the embedded corpus
    seq_len: int = 128
    batch_size: int = 16
    micro_batch_size: int | None = None
    seed: int = 0  # seed of the training-window stream (BatchSampler)
    eval_batch_size: int = 16
    eval_max_batches: int | None = 16  # None: the whole validation split

    def validate(self) -> None:
        for name in ("seq_len", "batch_size", "eval_batch_size"):
            value = getattr(self, name)
            check(value > 0, name, f"must be a positive integer, got {value}")
        mb = self.micro_batch_size
        check(mb is None or mb > 0, "micro_batch_size", f"must be a positive integer, got {mb}")
        check(
            mb is None or self.batch_size % mb == 0,
            "micro_batch_size",
            f"must divide batch_size ({self.batch_size}), got {mb}",
        )
        check(self.seed >= 0, "seed", f"must be >= 0, got {self.seed}")
        emb = self.eval_max_batches
        check(emb is None or emb > 0, "eval_max_batches", f"must be null or > 0, got {emb}")

    @property
    def accumulation_steps(self) -> int:
        return self.batch_size // (self.micro_batch_size or self.batch_size)


@dataclasses.dataclass(kw_only=True)
class OptimConfig(Config):
    """AdamW (``moelab.train.optim.build_optimizer``) with linear warm-up and cosine decay.

    The lr rises linearly over ``warmup_steps`` to ``lr`` and follows a half cosine down to
    ``min_lr_ratio · lr`` at the last step (ReMoE: 5e-4 → 5e-5, i.e. a ratio of 0.1).

    ``table_optimizer`` is how the product-key tables (PEER/PKM, sparse row gradients) are updated:
    ``"lazy"`` touches only the rows retrieved in the step (moments and weight decay of the other
    rows frozen); ``"dense"`` is textbook AdamW on every row, as the PEER paper trained. Measured
    on peer-tiny in docs/peer.md ("Lazy vs dense table optimizer"). ``"rowwise"`` /
    ``"rowwise_bf16"``: lazy row-wise Adam (one second-moment scalar per row; float32 / bfloat16
    first moments), fewer bytes per step (docs/peer.md, "Row-wise optimizer state").
    """

    lr: float = 5e-4
    min_lr_ratio: float = 0.1
    warmup_steps: int = 10
    weight_decay: float = 0.01
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    grad_clip: float | None = 1.0  # max global L2 norm; null: no clipping
    # build_optimizer(table_optimizer=...); rowwise*: moelab.train.rowwise (docs/peer.md)
    table_optimizer: Literal["lazy", "dense", "rowwise", "rowwise_bf16"] = "lazy"

    def validate(self) -> None:
        check(math.isfinite(self.lr) and self.lr > 0, "lr", f"must be > 0, got {self.lr}")
        check(
            0 <= self.min_lr_ratio <= 1,
            "min_lr_ratio",
            f"must be in [0, 1], got {self.min_lr_ratio}",
        )
        check(self.warmup_steps >= 0, "warmup_steps", f"must be >= 0, got {self.warmup_steps}")
        check(self.weight_decay >= 0, "weight_decay", f"must be >= 0, got {self.weight_decay}")
        for name in ("beta1", "beta2"):
            value = getattr(self, name)
            check(0 <= value < 1, name, f"must be in [0, 1), got {value}")
        check(self.eps >= 0, "eps", f"must be >= 0, got {self.eps}")
        gc = self.grad_clip
        check(gc is None or gc > 0, "grad_clip", f"must be null or > 0, got {gc}")


@dataclasses.dataclass(kw_only=True)
class TrainConfig(Config):
    """Length, device and precision of the run, and ReMoE's λ controller (used when the model has
    ReLU-routed layers)."""

    steps: int = 300
    seed: int = 0  # model initialisation
    eval_every: int = 100  # validation every N steps (and at the end); 0: only at the end
    device: Literal["auto", "cpu", "cuda"] = "auto"
    precision: Literal["auto", "fp32", "bf16"] = "auto"  # auto: bf16 autocast on CUDA
    threads: int | None = None  # torch CPU threads; null: torch's default
    lambda0: float = 1e-8  # ReMoE λ_0
    lambda_alpha: float = 1.2  # ReMoE α
    lambda_per_layer: bool = False  # one λ per ReLU-routed layer (default: the paper's shared λ)
    lambda_min: float = LAMBDA_MIN  # λ's floor (so it can always climb back)
    lambda_max: float = LAMBDA_MAX  # λ's ceiling (so an unreachable target cannot drive it to inf)
    # A step whose loss or gradient norm is NaN/inf: stop (keep the last good checkpoint, exit
    # non-zero naming the step) or skip it (no update; stop after 10 such steps in a row).
    on_nonfinite: Literal["stop", "skip"] = "stop"

    def validate(self) -> None:
        check(self.steps > 0, "steps", f"must be a positive integer, got {self.steps}")
        check(self.seed >= 0, "seed", f"must be >= 0, got {self.seed}")
        check(self.eval_every >= 0, "eval_every", f"must be >= 0, got {self.eval_every}")
        t = self.threads
        check(t is None or t > 0, "threads", f"must be null or a positive integer, got {t}")
        check(self.lambda0 > 0, "lambda0", f"must be > 0, got {self.lambda0}")
        check(self.lambda_alpha > 1, "lambda_alpha", f"must be > 1, got {self.lambda_alpha}")
        for name in ("lambda_min", "lambda_max"):
            value = getattr(self, name)
            check(math.isfinite(value) and value > 0, name, f"must be finite and > 0, got {value}")
        check(
            self.lambda_min <= self.lambda0 <= self.lambda_max,
            "lambda0",
            f"must lie in [lambda_min, lambda_max] = [{self.lambda_min:g}, {self.lambda_max:g}], "
            f"got {self.lambda0:g}",
        )


@dataclasses.dataclass(kw_only=True)
class LoggingConfig(Config):
    """What is written where: ``metrics.jsonl`` always; TensorBoard / W&B (offline) on request."""

    log_every: int = 10
    # also log every step up to this one: ReMoE's stage I (sparsity falling before λ acts) lasts
    # ~20 steps at the presets' learning rate, shorter than the log_every interval
    log_each_step_until: int = 0
    progress: bool = True
    tensorboard: bool = False
    wandb: bool = False
    wandb_project: str = "moelab"

    def validate(self) -> None:
        check(self.log_every > 0, "log_every", f"must be a positive integer, got {self.log_every}")
        until = self.log_each_step_until
        check(until >= 0, "log_each_step_until", f"must be >= 0, got {until}")


@dataclasses.dataclass(kw_only=True)
class CheckpointConfig(Config):
    """Checkpoint every ``every`` steps (0: only at the end / on Ctrl-C), keep ``keep_last``."""

    every: int = 100
    keep_last: int = 2

    def validate(self) -> None:
        check(self.every >= 0, "every", f"must be >= 0, got {self.every}")
        check(self.keep_last >= 1, "keep_last", f"must be >= 1, got {self.keep_last}")


@dataclasses.dataclass(kw_only=True)
class RunConfig(Config):
    """Everything a run needs; serialised as ``config.yaml`` in the run directory."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)

    def validate(self) -> None:
        check(
            self.data.seq_len <= self.model.max_seq_len,
            "data.seq_len",
            f"must be <= model.max_seq_len ({self.model.max_seq_len}), got {self.data.seq_len}",
        )
        check(self.data.eval_batch_size > 0, "data.eval_batch_size", "must be a positive integer")
        try:  # a training sequence the FFN slot can learn from (Lory: two segments at least)
            self.model.check_seq_len(self.data.seq_len, "data.seq_len")
        except ConfigError as err:
            raise err.under("model") from None

    @property
    def method(self) -> str:
        return method_name(self.model)


def method_name(model: ModelConfig) -> str:
    """Short name of the FFN method: ``dense``, ``topk``, ``remoe``, ``peer``, ``pkm``, ..."""
    return model.ffn.method


# ------------------------------------------------------------------------------------- presets


def _preset_dir() -> Path:
    return Path(str(resources.files("moelab") / "configs"))


def list_presets() -> list[str]:
    """Names of the shipped presets (``moelab/configs/*.yaml``)."""
    return sorted(p.stem for p in _preset_dir().glob("*.yaml"))


def preset_path(name: str) -> Path:
    """Path of preset ``name``; ValueError listing the presets when there is none."""
    path = _preset_dir() / f"{name}.yaml"
    if not path.is_file():
        raise ConfigError(
            "preset", f"unknown preset {name!r}; allowed: {', '.join(list_presets())}"
        )
    return path


def resolve_run_config(
    preset: str | None = None, config_file: str | Path | None = None, overrides: Iterable[str] = ()
) -> RunConfig:
    """The :class:`RunConfig` of a preset or a YAML file (default: :data:`DEFAULT_PRESET`), with
    dotted ``overrides`` applied; raises ValueError naming the field on any mistake."""
    if preset is not None and config_file is not None:
        raise ConfigError("", "give either --preset or --config, not both")
    if config_file is not None:
        path = Path(config_file)
        if not path.is_file():
            raise ConfigError("config", f"file {str(path)!r} does not exist")
    else:
        path = preset_path(preset or DEFAULT_PRESET)
    return load_config(RunConfig, path, list(overrides))
