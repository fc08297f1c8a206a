"""A finished (or running) run read back through its :class:`~moelab.rundir.RunDir`: typed config,
model, tokenizer, and its evaluation (``moelab eval``).

These live in ``moelab.train`` because they need :class:`RunConfig`; the file layout they read is
``RunDir``'s.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from moelab.data import TokenDataset, check_vocab_compatible
from moelab.data.tokenizer import TextTokenizer
from moelab.eval.perplexity import evaluate
from moelab.model import TransformerLM
from moelab.rundir import RunDir
from moelab.train.config import RunConfig
from moelab.train.setup import open_dataset

__all__ = ["evaluate_run", "load_run", "load_run_config", "run_tokenizer"]


def load_run_config(run_dir: str | Path) -> RunConfig:
    """The :class:`RunConfig` a run was (last) started with."""
    return RunDir(run_dir).read_config(RunConfig)


def load_run(
    run_dir: str | Path, checkpoint: str | int | Path | None = None
) -> tuple[TransformerLM, RunConfig]:
    """``(model, run_config)`` of a run, weights from ``checkpoint`` (default: the latest one).

    The model is on CPU in ``eval()`` mode; move it with ``.to(device)``. Raises
    :class:`~moelab.checkpoint_io.CheckpointError` (a ValueError naming the file) when the
    checkpoint is missing, truncated or corrupt.
    """
    config = load_run_config(run_dir)
    return RunDir(run_dir).load_model(config.model, checkpoint), config


def run_tokenizer(run_dir: str | Path) -> TextTokenizer:
    """The tokenizer a run was trained with (its copy in the run dir, else its dataset's)."""
    run = RunDir(run_dir)
    if run.has_tokenizer:
        return run.tokenizer()
    config = load_run_config(run_dir)
    if config.data.path is not None and Path(config.data.path).is_dir():
        return run.tokenizer(TokenDataset(config.data.path))
    return run.tokenizer()


def evaluate_run(
    run_dir: str | Path,
    data: str | Path | None = None,
    split: str = "val",
    max_batches: int | None = None,
    batch_size: int | None = None,
    checkpoint: str | int | None = None,
) -> dict[str, Any]:
    """:func:`~moelab.eval.evaluate` of a run's checkpoint on its own dataset or on ``data`` (which
    must use the run's tokenizer); adds ``checkpoint`` and ``dataset`` to the result."""
    if max_batches is not None and max_batches < 1:
        raise ValueError(f"--max-batches: must be >= 1, got {max_batches}")
    if batch_size is not None and batch_size < 1:
        raise ValueError(f"--batch-size: must be >= 1, got {batch_size}")
    run = RunDir(run_dir)
    model, config = load_run(run_dir, checkpoint)
    if config.train.threads is not None:  # the run's choice (tiny presets: 1, see training.md)
        torch.set_num_threads(config.train.threads)
    if data is not None:
        path = Path(data).expanduser()
        if not path.exists():
            raise ValueError(f"--data: {str(path)!r} does not exist")
        try:
            dataset = TokenDataset(path)
        except ValueError as err:
            raise ValueError(f"--data: {err}") from None
        check_vocab_compatible(dataset, config.model.vocab_size)
    else:
        dataset = open_dataset(config)
    run.check_same_tokenizer(dataset)
    if torch.cuda.is_available():
        model = model.cuda()
    result = evaluate(
        model,
        dataset,
        config.data.seq_len,
        batch_size or config.data.eval_batch_size,
        max_batches,
        split=split,
        bf16=torch.cuda.is_available(),
    )
    result["checkpoint"] = run.find_checkpoint(checkpoint).name
    result["dataset"] = str(dataset.path)
    return result
