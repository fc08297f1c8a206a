"""A run's checkpoints: where they are, how they are found, written and read back.

The checkpoint half of :class:`~moelab.rundir.RunDir` (a base class: it reads the run's ``path``
and names its files). How the bytes are written safely (temporary directory, fsync, rename) is
:mod:`moelab.checkpoint_io`'s job; which names it writes is decided here.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any, ClassVar

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
from moelab.model import ModelConfig, TransformerLM

__all__ = ["CheckpointFiles"]


class CheckpointFiles:
    """``checkpoints/`` of a run directory (see :mod:`moelab.rundir` for the layout)."""

    CHECKPOINTS = "checkpoints"
    LATEST = "latest"
    WEIGHTS = "model.safetensors"
    STATE = "state.pt"
    SHARDED = "sharded"  # torch.distributed.checkpoint files of a run trained on several processes
    SHARDED_MODEL = "model."  # key prefix of the weights in SHARDED
    SHARDED_OPTIMIZER = "optim."  # key prefix of the optimizer state in SHARDED
    STEP_PREFIX = "step_"
    TMP_PREFIX = ".tmp-"  # half-written checkpoints and pointers; ignored, then removed

    path: Path
    CONFIG: ClassVar[str]  # the run's config file, named when weights do not fit it

    @property
    def has_latest(self) -> bool:
        """A checkpoint was committed and pointed at (a run that can resume)."""
        return (self._ckpt_root / self.LATEST).is_file()

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
        """Checkpoint directories, oldest first (by step number, so ``step_100000000`` comes
        after ``step_99999999``); temporary ones and other names are ignored."""
        root = self._ckpt_root
        if not root.is_dir():
            return []
        found = [
            p
            for p in root.iterdir()
            if p.is_dir()
            and p.name.startswith(self.STEP_PREFIX)
            and p.name.removeprefix(self.STEP_PREFIX).isdigit()
        ]
        return sorted(found, key=self.step_of)

    def is_complete(self, checkpoint: Path) -> bool:
        """A checkpoint with its training state and its weights (safetensors, or a sharded
        directory with its metadata): what a committed checkpoint always holds."""
        weights = (checkpoint / self.WEIGHTS).is_file() or (
            checkpoint / self.SHARDED / ".metadata"
        ).is_file()
        return weights and (checkpoint / self.STATE).is_file()

    def latest_checkpoint(self) -> Path:
        """The checkpoint ``latest`` names, or the newest complete one when ``latest`` is missing
        (a run killed between committing a checkpoint and pointing at it; a ``step_*`` directory
        without its state or weights, e.g. one copied in by hand, is passed over)."""
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
        ckpts = [p for p in self.checkpoints() if self.is_complete(p)]
        if not ckpts:
            raise CheckpointError(
                f"{self.path}: no checkpoint found (expected {root}/{self.STEP_PREFIX}*/ with "
                f"{self.STATE})"
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
        _check_shapes(model, ckpt / self.WEIGHTS, self.CONFIG)
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


def _check_shapes(model: nn.Module, path: Path, config_name: str) -> None:
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
            f"{path}: weights do not fit the model of {config_name}: {name} is {list(old)} in "
            f"the checkpoint, {list(new)} in the model{more}"
        )
