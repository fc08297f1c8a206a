"""Training: typed run configs and presets, the trainer, checkpoints, metrics, ``load_run``.

Public API (see ``docs/training.md`` and ``docs/CONTRACTS.md`` "Runs"): :class:`RunConfig`,
:func:`resolve_run_config`, :func:`list_presets`, :class:`Trainer`, :func:`train`,
:func:`load_run`, :class:`CheckpointError`, :func:`lr_at`.
"""

from moelab.train.checkpoint import CheckpointError, find_checkpoint, save_checkpoint
from moelab.train.config import (
    DEFAULT_PRESET,
    RunConfig,
    list_presets,
    method_name,
    preset_path,
    resolve_run_config,
)
from moelab.train.run import load_run, load_run_config, run_tokenizer
from moelab.train.schedule import lr_at
from moelab.train.trainer import Trainer, open_dataset, train

__all__ = [
    "DEFAULT_PRESET",
    "CheckpointError",
    "RunConfig",
    "Trainer",
    "find_checkpoint",
    "list_presets",
    "load_run",
    "load_run_config",
    "lr_at",
    "method_name",
    "open_dataset",
    "preset_path",
    "resolve_run_config",
    "run_tokenizer",
    "save_checkpoint",
    "train",
]
