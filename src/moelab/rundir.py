"""A run directory: the one place that knows what a run keeps where.

::

    RUN_DIR/
      config.yaml          the resolved run config (re-read by --resume, eval, generate, analysis)
      tokenizer.json       copy of the dataset's tokenizer (the ids of every file below)
      accounting.json      params / active params / FLOPs of the model
      metrics.jsonl        one JSON object per line: train and eval records
      summary.json         written when the run completes
      provenance.json      per training process: code (git commit, dirty), torch, CPU/GPU,
                           threads, data checksum, the step it started at (moelab.provenance)
      tensorboard/         only with logging.tensorboard
      checkpoints/
        latest             text: the newest checkpoint's name
        step_XXXXXXXX/     model.safetensors (weights) + state.pt (everything a resume needs);
                           a run trained on several processes (torchrun): sharded/ (weights and
                           optimizer state, torch.distributed.checkpoint) + state.pt (the rest)

Training, evaluation, analysis and the commands reach these files through :class:`RunDir` only, so
the layout can change in one place. How a checkpoint is written safely (temporary directory,
fsync, rename) is :mod:`moelab.checkpoint_io`'s job; which names it writes is decided here.

``RunDir`` sits below :mod:`moelab.train`: it reads and writes any typed :class:`~moelab.config.
Config` and the caller names the class (``moelab.train.RunConfig``), so the training, evaluation
and analysis packages can all use it without importing one another.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import IO, Any, TypeVar

import yaml
from safetensors import SafetensorError, safe_open
from torch import nn

from moelab.checkpoint_io import (
    CheckpointError,
    commit_directory,
    load_sharded,
    load_state,
    load_weights,
    replace_text,
    save_state,
    save_weights,
    sharded_metadata,
)
from moelab.config import Config, ConfigError, dump_yaml, load_config
from moelab.data import TokenDataset, load_tokenizer
from moelab.data.tokenizer import TextTokenizer, file_sha256
from moelab.model import ModelConfig, TransformerLM

__all__ = ["CheckpointError", "MetricsWriter", "RunDir"]

C = TypeVar("C", bound=Config)


class MetricsWriter:
    """Appends records to ``metrics.jsonl``, one JSON object per line, flushed at once (a killed
    run loses at most the line being written)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._file: IO[str] = open(path, "a", encoding="utf-8")  # noqa: SIM115 - see close()

    def write(self, record: dict[str, Any]) -> None:
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


class RunDir:
    """The files of one training run (see the module docstring for the layout)."""

    CONFIG = "config.yaml"
    TOKENIZER = "tokenizer.json"
    ACCOUNTING = "accounting.json"
    METRICS = "metrics.jsonl"
    SUMMARY = "summary.json"
    PROVENANCE = "provenance.json"
    TENSORBOARD = "tensorboard"
    CHECKPOINTS = "checkpoints"
    LATEST = "latest"
    WEIGHTS = "model.safetensors"
    STATE = "state.pt"
    SHARDED = "sharded"  # torch.distributed.checkpoint files of a run trained on several processes
    SHARDED_MODEL = "model."  # key prefix of the weights in SHARDED
    SHARDED_OPTIMIZER = "optim."  # key prefix of the optimizer state in SHARDED
    STEP_PREFIX = "step_"
    TMP_PREFIX = ".tmp-"  # half-written checkpoints and pointers; ignored, then removed

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path).expanduser()

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"

    @property
    def name(self) -> str:
        return self.path.name

    # ---- what is there --------------------------------------------------------------------------

    @property
    def holds_run(self) -> bool:
        """A run was started here (its config is written before the first step)."""
        return (self.path / self.CONFIG).is_file()

    @property
    def has_summary(self) -> bool:
        """The run completed (the summary is written last)."""
        return (self.path / self.SUMMARY).is_file()

    @property
    def has_metrics(self) -> bool:
        return (self.path / self.METRICS).is_file()

    @property
    def has_latest(self) -> bool:
        """A checkpoint was committed and pointed at (a run that can resume)."""
        return (self._ckpt_root / self.LATEST).is_file()

    def create(
        self, config: Config, dataset: TokenDataset, accounting: dict[str, Any], *, replace: bool
    ) -> None:
        """Lay out a new run: its config, its dataset's tokenizer and its model's accounting.
        ``replace`` first removes the run already here."""
        if replace:
            shutil.rmtree(self.path)
        self.path.mkdir(parents=True, exist_ok=True)
        self.write_config(config)
        if dataset.tokenizer_file.is_file():
            shutil.copyfile(dataset.tokenizer_file, self.path / self.TOKENIZER)
        (self.path / self.ACCOUNTING).write_text(json.dumps(accounting, indent=2))

    # ---- config ---------------------------------------------------------------------------------

    def write_config(self, config: Config) -> None:
        dump_yaml(config, self.path / self.CONFIG)

    def read_config(self, cls: type[C]) -> C:
        """The run's config as ``cls`` (validated); ConfigError when this is not a run."""
        path = self.path / self.CONFIG
        if not path.is_file():
            raise ConfigError(
                "run_dir", f"{str(self.path)!r} is not a moelab run (no {self.CONFIG})"
            )
        return load_config(cls, path)

    def raw_config(self) -> dict[str, Any]:
        """The config as plain data, unvalidated (``{}`` when missing or unreadable): analysis
        reads hand-written or older runs whose config would not validate today."""
        path = self.path / self.CONFIG
        if not path.is_file():
            return {}
        try:
            data = yaml.safe_load(path.read_text("utf-8")) or {}
        except yaml.YAMLError:
            return {}
        return data if isinstance(data, dict) else {}

    # ---- tokenizer ------------------------------------------------------------------------------

    @property
    def has_tokenizer(self) -> bool:
        return (self.path / self.TOKENIZER).is_file()

    def tokenizer(self, dataset: TokenDataset | None = None) -> TextTokenizer:
        """The tokenizer the run was trained with: its own copy, else ``dataset``'s, else the
        shipped one."""
        if self.has_tokenizer:
            return load_tokenizer(self.path / self.TOKENIZER)
        return dataset.tokenizer() if dataset is not None else load_tokenizer()

    def tokenizer_sha256(self) -> str | None:
        """Hash of the run's tokenizer copy (None without one): what identifies its token ids."""
        return file_sha256(self.path / self.TOKENIZER) if self.has_tokenizer else None

    def check_same_tokenizer(self, dataset: TokenDataset, field: str = "--data") -> None:
        """Refuse a dataset tokenised with another tokenizer than the run's (meaningless losses)."""
        own = self.tokenizer_sha256()
        theirs = dataset.meta.get("tokenizer_sha256")
        if own and theirs and own != theirs:
            raise ValueError(
                f"{field}: {dataset.path} was tokenised with {dataset.meta.get('tokenizer')} "
                f"(sha256 {theirs[:12]}), but run {self.path} was trained with another "
                f"tokenizer (sha256 {own[:12]}); prepare the data with the run's {self.TOKENIZER}"
            )

    # ---- provenance -----------------------------------------------------------------------------

    def add_provenance(self, record: dict[str, Any]) -> None:
        """Append the provenance of one training process (start and each resume) to the run."""
        records = self.provenance() + [record]
        (self.path / self.PROVENANCE).write_text(json.dumps(records, indent=2))

    def set_origin(self, origin: dict[str, Any]) -> None:
        """Record, in the run's first provenance record, the run or checkpoint whose weights this
        run started from and how they were changed (``convert-hf``, ``upcycle``, ``prune``)."""
        records = self.provenance()
        if not records:
            raise ValueError(f"{self.path}: no provenance record to attach an origin to")
        records[0]["origin"] = origin
        (self.path / self.PROVENANCE).write_text(json.dumps(records, indent=2))

    def provenance(self) -> list[dict[str, Any]]:
        """One record per training process of this run, oldest first (``[]`` for older runs)."""
        path = self.path / self.PROVENANCE
        if not path.is_file():
            return []
        try:
            records = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}: not valid JSON ({err})") from None
        return records if isinstance(records, list) else [records]

    def recorded_preset(self) -> str | None:
        """The preset the run was started from (its first training process records it; older
        runs: the summary's), so a resumed run's summary keeps it."""
        for record in self.provenance():
            if isinstance(record, dict) and record.get("preset"):
                return str(record["preset"])
        return self.read_summary().get("preset")

    # ---- summary --------------------------------------------------------------------------------

    def write_summary(self, summary: dict[str, Any]) -> None:
        (self.path / self.SUMMARY).write_text(json.dumps(summary, indent=2))

    def remove_summary(self) -> None:
        """A resumed run is not complete until it writes a new summary (suites treat a run with a
        summary as finished)."""
        (self.path / self.SUMMARY).unlink(missing_ok=True)

    def read_summary(self) -> dict[str, Any]:
        """The summary (``{}`` while the run has none); ValueError naming the file if malformed."""
        path = self.path / self.SUMMARY
        if not path.is_file():
            return {}
        try:
            summary = json.loads(path.read_text("utf-8"))
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}: not valid JSON ({err})") from err
        if not isinstance(summary, dict):
            raise ValueError(f"{path}: expected a JSON object")
        return summary

    # ---- metrics --------------------------------------------------------------------------------

    @property
    def tensorboard_dir(self) -> Path:
        return self.path / self.TENSORBOARD

    def metrics_writer(self) -> MetricsWriter:
        """Appends to the run's metrics (a resumed run continues the same file)."""
        return MetricsWriter(self.path / self.METRICS)

    def read_metrics(self, kind: str | None = None) -> list[dict[str, Any]]:
        """The metrics records in order (only those of ``kind`` when given; ``[]`` without a
        metrics file). ValueError naming the file and line for a line that is not JSON."""
        path = self.path / self.METRICS
        if not path.is_file():
            return []
        records = []
        for n, line in enumerate(path.read_text("utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{n}: not valid JSON ({err})") from err
            if isinstance(obj, dict) and (kind is None or obj.get("kind") == kind):
                records.append(obj)
        return records

    def truncate_metrics(self, step: int) -> None:
        """Drop records after ``step`` (a resumed run rewrites what followed its checkpoint)."""
        path = self.path / self.METRICS
        if not path.is_file():
            return
        keep = [
            line
            for line in path.read_text().splitlines()
            if line.strip() and json.loads(line).get("step", 0) <= step
        ]
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("".join(line + "\n" for line in keep))
        tmp.replace(path)

    # ---- checkpoints ----------------------------------------------------------------------------

    @property
    def _ckpt_root(self) -> Path:
        return self.path / self.CHECKPOINTS

    @classmethod
    def step_name(cls, step: int) -> str:
        return f"{cls.STEP_PREFIX}{step:08d}"

    @classmethod
    def step_of(cls, checkpoint: Path) -> int:
        """The step a checkpoint directory holds (from its ``step_*`` name)."""
        try:
            return int(checkpoint.name.removeprefix(cls.STEP_PREFIX))
        except ValueError:
            raise CheckpointError(f"{checkpoint}: not a checkpoint directory name") from None

    def checkpoints(self) -> list[Path]:
        """Complete checkpoint directories, oldest first; temporary ones are ignored."""
        root = self._ckpt_root
        if not root.is_dir():
            return []
        return sorted(
            p for p in root.iterdir() if p.is_dir() and p.name.startswith(self.STEP_PREFIX)
        )

    def latest_checkpoint(self) -> Path:
        """The checkpoint ``latest`` names, or the newest complete one when ``latest`` is missing
        (a run killed between committing a checkpoint and pointing at it)."""
        root = self._ckpt_root
        latest = root / self.LATEST
        if latest.is_file():
            name = latest.read_text().strip()
            path = root / name
            if not name.startswith(self.STEP_PREFIX) or not path.is_dir():
                raise CheckpointError(
                    f"{latest}: names checkpoint {name!r}, which does not exist in {root}"
                )
            return path
        ckpts = self.checkpoints()
        if not ckpts:
            raise CheckpointError(
                f"{self.path}: no checkpoint found (expected {root}/{self.STEP_PREFIX}*/)"
            )
        return ckpts[-1]

    def find_checkpoint(self, checkpoint: str | int | Path | None = None) -> Path:
        """A checkpoint directory: ``None`` = :meth:`latest_checkpoint`, a step number, a
        ``step_*`` name, or a path."""
        if checkpoint is None:
            return self.latest_checkpoint()
        if isinstance(checkpoint, int) or (isinstance(checkpoint, str) and checkpoint.isdigit()):
            path = self._ckpt_root / self.step_name(int(checkpoint))
        else:
            path = Path(checkpoint)
            if not path.is_absolute() and not path.exists():
                path = self._ckpt_root / str(checkpoint)
        if not path.is_dir():
            raise CheckpointError(f"checkpoint {checkpoint!r} not found (looked for {path})")
        return path

    def clean_temporary(self) -> list[Path]:
        """Remove half-written checkpoints left by a killed run; returns what was removed."""
        root = self._ckpt_root
        removed = []
        if root.is_dir():
            for p in root.iterdir():
                if p.name.startswith(self.TMP_PREFIX):
                    shutil.rmtree(p, ignore_errors=True)
                    removed.append(p)
        return removed

    def save_checkpoint(
        self, step: int, model: nn.Module, state: dict[str, Any], keep_last: int = 2
    ) -> Path:
        """Write the checkpoint of ``step`` atomically, point ``latest`` at it, keep the last
        ``keep_last``. ``state`` (optimizer, scheduler, controller, RNG, sampler, step...) goes
        to the state file, the weights to safetensors."""
        root = self._ckpt_root
        root.mkdir(parents=True, exist_ok=True)
        self.clean_temporary()
        name = self.step_name(step)
        tmp = root / f"{self.TMP_PREFIX}{name}-{os.getpid()}"
        tmp.mkdir()
        try:
            save_weights(model, tmp / self.WEIGHTS, step)
            save_state(state, tmp / self.STATE)
            commit_directory(tmp, root / name)
        except BaseException:  # a failed write leaves nothing behind, not even its temporary
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return self._point_latest(name, keep_last)

    def _point_latest(self, name: str, keep_last: int) -> Path:
        """Point ``latest`` at the committed checkpoint ``name``; keep the last ``keep_last``."""
        root = self._ckpt_root
        pointer_tmp = root / f"{self.TMP_PREFIX}{self.LATEST}-{os.getpid()}"
        replace_text(root / self.LATEST, name + "\n", pointer_tmp)
        for old in self.checkpoints()[:-keep_last]:
            if old.name != name:
                shutil.rmtree(old, ignore_errors=True)
        return root / name

    # ---- sharded checkpoints (several processes) ------------------------------------------------

    def is_sharded(self, checkpoint: Path) -> bool:
        """The checkpoint was written by a run on several processes (:attr:`SHARDED`)."""
        return (checkpoint / self.SHARDED).is_dir()

    def sharded_tmp(self, step: int) -> Path:
        """The temporary directory every process of a run writes the checkpoint of ``step``
        into (the same name on every rank)."""
        return self._ckpt_root / f"{self.TMP_PREFIX}{self.step_name(step)}-sharded"

    def begin_sharded_checkpoint(self, step: int) -> Path:
        """Rank 0, before the ranks write: an empty :meth:`sharded_tmp`, leftovers removed;
        returns where the tensors go (``<tmp>/sharded``)."""
        self._ckpt_root.mkdir(parents=True, exist_ok=True)
        self.clean_temporary()
        tmp = self.sharded_tmp(step)
        tmp.mkdir()
        return tmp / self.SHARDED

    def commit_sharded_checkpoint(
        self, step: int, state: dict[str, Any], keep_last: int = 2
    ) -> Path:
        """Rank 0, after every rank wrote its shards: add the training state, rename the
        checkpoint into place, point ``latest`` at it, keep the last ``keep_last``."""
        tmp = self.sharded_tmp(step)
        name = self.step_name(step)
        save_state(state, tmp / self.STATE)
        commit_directory(tmp, self._ckpt_root / name)
        return self._point_latest(name, keep_last)

    def sharded_shapes(self, checkpoint: Path) -> dict[str, tuple[int, ...]]:
        """``key → global shape`` of the tensors of a sharded checkpoint."""
        meta = sharded_metadata(checkpoint / self.SHARDED)
        return {name: shape for name, (shape, _) in meta.items()}

    def load_weights(self, model: nn.Module, checkpoint: str | int | Path | None = None) -> Path:
        """Load a checkpoint's weights into ``model`` (strict); returns the checkpoint used."""
        ckpt = self.find_checkpoint(checkpoint)
        if self.is_sharded(ckpt):  # written by several processes: read whole tensors here
            self.check_sharded_shapes(model, ckpt)
            tensors = {self.SHARDED_MODEL + k: t for k, t in model.state_dict().items()}
            load_sharded(tensors, ckpt / self.SHARDED, no_dist=True)
            return ckpt
        _check_shapes(model, ckpt / self.WEIGHTS)
        load_weights(model, ckpt / self.WEIGHTS)
        return ckpt

    def check_sharded_shapes(
        self, model: nn.Module, checkpoint: Path, sharded: dict[str, Any] | None = None
    ) -> None:
        """One line naming the first weight whose saved shape differs from the model's (or that
        is missing); ``sharded``: names whose full shape is ``sharded[name].global_shape``."""
        saved = self.sharded_shapes(checkpoint)
        for name, t in model.state_dict().items():
            full = tuple(sharded[name].global_shape) if sharded and name in sharded else None
            want = full or tuple(t.shape)
            got = saved.get(self.SHARDED_MODEL + name)
            if got is None:
                raise CheckpointError(
                    f"{checkpoint / self.SHARDED}: no weights {name!r} for the model of "
                    f"{self.CONFIG}"
                )
            if got != want:
                raise CheckpointError(
                    f"{checkpoint / self.SHARDED}: weights do not fit the model of {self.CONFIG}: "
                    f"{name} is {list(got)} in the checkpoint, {list(want)} in the model"
                )

    def load_checkpoint(
        self, model: nn.Module, checkpoint: str | int | Path | None = None
    ) -> tuple[Path, dict[str, Any]]:
        """Load weights into ``model`` and return ``(checkpoint dir, training state)``."""
        ckpt = self.load_weights(model, checkpoint)
        return ckpt, load_state(ckpt / self.STATE)

    def load_model(
        self, model_config: ModelConfig, checkpoint: str | int | Path | None = None
    ) -> TransformerLM:
        """A model built from ``model_config`` with a checkpoint's weights (default: the latest),
        on CPU in ``eval()`` mode."""
        model = TransformerLM(model_config)
        self.load_weights(model, checkpoint)
        return model.eval()


def _check_shapes(model: nn.Module, path: Path) -> None:
    """One line naming the first tensor whose saved shape differs from the model's (a config
    edited after the run started), instead of torch's multi-line message; unreadable files are
    left to :func:`~moelab.checkpoint_io.load_weights`, which names them."""
    try:
        with safe_open(str(path), framework="pt") as f:
            saved = {name: tuple(f.get_slice(name).get_shape()) for name in f.keys()}  # noqa: SIM118
    except (SafetensorError, OSError, ValueError):
        return
    wrong = [
        (name, saved[name], tuple(t.shape))
        for name, t in model.state_dict().items()
        if name in saved and saved[name] != tuple(t.shape)
    ]
    if wrong:
        name, old, new = wrong[0]
        more = f" (and {len(wrong) - 1} more tensors)" if len(wrong) > 1 else ""
        raise CheckpointError(
            f"{path}: weights do not fit the model of {RunDir.CONFIG}: {name} is {list(old)} in "
            f"the checkpoint, {list(new)} in the model{more}"
        )
