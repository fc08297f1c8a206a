"""Training: typed run configs and presets, the trainer, reading runs back (``load_run``).

Public API (see ``docs/training.md`` and ``docs/CONTRACTS.md`` "Runs"): :class:`RunConfig`,
:func:`resolve_run_config`, :func:`list_presets`, :class:`Trainer`, :func:`train`,
:func:`load_run`, :func:`run_tokenizer`, :func:`evaluate_run`, :class:`CheckpointError`,
:func:`lr_at`. A run directory's files are :class:`moelab.rundir.RunDir`'s.
"""

from moelab.checkpoint_io import CheckpointError
from moelab.train.config import (
    DEFAULT_PRESET,
    RunConfig,
    list_presets,
    method_name,
    preset_path,
    resolve_run_config,
)
from moelab.train.new_run import run_config_for, start_run
from moelab.train.run import evaluate_run, load_run, load_run_config, run_tokenizer
from moelab.train.schedule import lr_at
from moelab.train.setup import check_trainable, open_dataset
from moelab.train.trainer import Trainer, train

__all__ = [
    "DEFAULT_PRESET",
    "CheckpointError",
    "RunConfig",
    "Trainer",
    "check_trainable",
    "evaluate_run",
    "list_presets",
    "load_run",
    "load_run_config",
    "lr_at",
    "method_name",
    "open_dataset",
    "preset_path",
    "resolve_run_config",
    "run_config_for",
    "run_tokenizer",
    "start_run",
    "train",
]
