"""Reading finished (or running) runs back: config, weights, tokenizer."""

from __future__ import annotations

from pathlib import Path

from moelab.config import ConfigError, load_config
from moelab.data import TokenDataset, load_tokenizer
from moelab.data.tokenizer import TextTokenizer
from moelab.model import TransformerLM
from moelab.train.checkpoint import find_checkpoint, load_weights
from moelab.train.config import RunConfig

__all__ = ["load_run", "load_run_config", "run_tokenizer"]


def load_run_config(run_dir: str | Path) -> RunConfig:
    """The :class:`RunConfig` stored in ``RUN_DIR/config.yaml``."""
    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        raise ConfigError("run_dir", f"{str(run_dir)!r} is not a moelab run (no config.yaml)")
    return load_config(RunConfig, path)


def load_run(
    run_dir: str | Path, checkpoint: str | int | Path | None = None
) -> tuple[TransformerLM, RunConfig]:
    """``(model, run_config)`` of a run, weights from ``checkpoint`` (default: the latest one).

    The model is on CPU in ``eval()`` mode; move it with ``.to(device)``. Raises
    :class:`~moelab.train.checkpoint.CheckpointError` (a ValueError naming the file) when the
    checkpoint is missing, truncated or corrupt.
    """
    config = load_run_config(run_dir)
    model = TransformerLM(config.model)
    load_weights(model, find_checkpoint(run_dir, checkpoint))
    return model.eval(), config


def run_tokenizer(run_dir: str | Path) -> TextTokenizer:
    """The tokenizer a run was trained with (its copy in the run dir, else its dataset's)."""
    own = Path(run_dir) / "tokenizer.json"
    if own.is_file():
        return load_tokenizer(own)
    config = load_run_config(run_dir)
    if config.data.path is not None and Path(config.data.path).is_dir():
        return TokenDataset(config.data.path).tokenizer()
    return load_tokenizer()
