"""Evaluate a run directory (``moelab eval``): its latest weights on its own or another dataset."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from moelab.data import TokenDataset, check_vocab_compatible
from moelab.data.tokenizer import file_sha256
from moelab.eval.perplexity import evaluate

__all__ = ["check_same_tokenizer", "evaluate_run"]


def check_same_tokenizer(run_dir: str | Path, dataset: TokenDataset, field: str = "--data") -> None:
    """Refuse a dataset tokenised with another tokenizer than the run's (meaningless losses)."""
    own = Path(run_dir) / "tokenizer.json"
    theirs = dataset.meta.get("tokenizer_sha256")
    if own.is_file() and theirs and file_sha256(own) != theirs:
        raise ValueError(
            f"{field}: {dataset.path} was tokenised with {dataset.meta.get('tokenizer')} "
            f"(sha256 {theirs[:12]}), but run {run_dir} was trained with another tokenizer "
            f"(sha256 {file_sha256(own)[:12]}); prepare the data with the run's tokenizer.json"
        )


def evaluate_run(
    run_dir: str | Path,
    data: str | Path | None = None,
    split: str = "val",
    max_batches: int | None = None,
    batch_size: int | None = None,
    checkpoint: str | int | None = None,
) -> dict[str, Any]:
    """:func:`~moelab.eval.evaluate` of a run's checkpoint; adds ``checkpoint`` and ``dataset``."""
    import torch

    from moelab.train import find_checkpoint, load_run, open_dataset

    if max_batches is not None and max_batches < 1:
        raise ValueError(f"--max-batches: must be >= 1, got {max_batches}")
    if batch_size is not None and batch_size < 1:
        raise ValueError(f"--batch-size: must be >= 1, got {batch_size}")
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
    check_same_tokenizer(run_dir, dataset)
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
    result["checkpoint"] = find_checkpoint(run_dir, checkpoint).name
    result["dataset"] = str(dataset.path)
    return result
