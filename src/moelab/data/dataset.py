"""Reading prepared token directories: random training windows and sequential eval windows.

Why memmaps: the splits can be larger than RAM and several workers may read them at once; a
window is one slice of the flat array, gathered with vectorised indexing (no per-token Python).
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from moelab.data.prepare import SPLITS, domain_file, token_file
from moelab.data.tokenizer import TextTokenizer, load_tokenizer


class TokenDataset:
    """A directory written by :func:`moelab.data.prepare` (``meta.json`` + memmapped splits)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path).expanduser()
        meta_path = self.path / "meta.json"
        if not meta_path.is_file():
            raise ValueError(
                f"dataset {self.path}: no meta.json here; expected a directory made "
                "by `moelab data prepare` (or moelab.data.default_dataset_dir())"
            )
        self.meta: dict[str, Any] = json.loads(meta_path.read_text("utf-8"))
        self.dtype = np.dtype(self.meta["dtype"])
        self._cache: dict[tuple[str, str], np.ndarray] = {}

    @property
    def vocab_size(self) -> int:
        return int(self.meta["vocab_size"])

    @property
    def domains(self) -> list[str]:
        return list(self.meta["domains"])

    @property
    def eos_id(self) -> int:
        return int(self.meta["eos_id"])

    def _array(self, split: str, kind: str) -> np.ndarray:
        if split not in SPLITS:
            raise ValueError(f"split: unknown split {split!r} (allowed: {', '.join(SPLITS)})")
        key = (split, kind)
        if key not in self._cache:
            name, dtype = (
                (token_file(split), self.dtype)
                if kind == "tokens"
                else (domain_file(split), np.dtype(np.uint8))
            )
            file = self.path / name
            if file.stat().st_size == 0:  # np.memmap refuses empty files
                self._cache[key] = np.zeros(0, dtype=dtype)
            else:
                self._cache[key] = np.memmap(file, dtype=dtype, mode="r")
        return self._cache[key]

    def split(self, name: str) -> np.ndarray:
        """Token ids of ``"train"`` or ``"val"`` (read-only memmap)."""
        return self._array(name, "tokens")

    def domain_ids(self, name: str) -> np.ndarray:
        """Per-token index into :attr:`domains` for ``"train"`` or ``"val"`` (uint8 memmap)."""
        return self._array(name, "domains")

    def num_tokens(self, name: str) -> int:
        return len(self.split(name))

    @property
    def tokenizer_file(self) -> Path:
        """The copy of the tokenizer these ids came from, stored in the directory."""
        return self.path / self.meta.get("tokenizer_file", "tokenizer.json")

    def tokenizer(self) -> TextTokenizer:
        """The tokenizer these ids came from (the copy stored in the directory)."""
        return load_tokenizer(self.tokenizer_file)

    def __repr__(self) -> str:
        return (
            f"TokenDataset({str(self.path)!r}, vocab_size={self.vocab_size}, "
            f"tokens={self.meta.get('tokens')}, domains={self.domains})"
        )


def check_vocab_compatible(meta: Mapping[str, Any] | TokenDataset, model_vocab_size: int) -> None:
    """Raise ValueError if a model with ``model_vocab_size`` outputs cannot cover the data's ids.

    A larger model vocabulary is fine (e.g. padded to a multiple of 64); a smaller one would
    index out of range in the embedding.
    """
    if isinstance(meta, TokenDataset):
        meta = meta.meta
    data_vocab = int(meta["vocab_size"])
    if int(model_vocab_size) < data_vocab:
        raise ValueError(
            f"model.vocab_size: {model_vocab_size} is smaller than the dataset's tokenizer "
            f"vocab_size {data_vocab} (tokenizer {meta.get('tokenizer')}); set "
            f"model.vocab_size >= {data_vocab}"
        )


def _check_window(ds: TokenDataset, split: str, seq_len: int, batch_size: int) -> np.ndarray:
    if int(seq_len) < 1:
        raise ValueError(f"seq_len: must be >= 1, got {seq_len}")
    if int(batch_size) < 1:
        raise ValueError(f"batch_size: must be >= 1, got {batch_size}")
    tokens = ds.split(split)
    if len(tokens) < seq_len + 1:
        raise ValueError(
            f"seq_len: {seq_len} needs at least {seq_len + 1} tokens, split "
            f"{split!r} of {ds.path} has {len(tokens)}"
        )
    return tokens


def _to_long(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(a.astype(np.int64, copy=False))


class BatchSampler:
    """Random fixed-length training windows, deterministic in (seed, rank, position).

    Batch ``k`` depends only on the seed and ``k`` (not on earlier draws), so resuming from
    ``state_dict()`` reproduces exactly the batches an uninterrupted run would have seen.
    ``rank`` gives each worker its own stream from the same seed. ``shard=(index, count)``
    splits every batch instead: this sampler returns rows ``[index·b, (index+1)·b)``,
    ``b = batch_size / count``, of the batch a one-process sampler returns, so ``count``
    data-parallel ranks together train on exactly the one-process batches.
    """

    def __init__(
        self,
        dataset: TokenDataset,
        split: str,
        seq_len: int,
        batch_size: int,
        seed: int = 0,
        *,
        rank: int = 0,
        shard: tuple[int, int] | None = None,
    ) -> None:
        self.dataset = dataset
        self.split = split
        self.seq_len = int(seq_len)
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.rank = int(rank)
        if self.seed < 0 or self.rank < 0:
            raise ValueError(f"seed/rank: must be non-negative integers, got {seed}/{rank}")
        self._rows = slice(None)
        if shard is not None:
            index, count = int(shard[0]), int(shard[1])
            if count < 1 or not 0 <= index < count or self.batch_size % count:
                raise ValueError(
                    f"shard: ({index}, {count}) must be (index, count) with "
                    f"0 <= index < count and count dividing batch_size "
                    f"({self.batch_size})"
                )
            local = self.batch_size // count
            self._rows = slice(index * local, (index + 1) * local)
        self.position = 0
        self._tokens = _check_window(dataset, split, self.seq_len, self.batch_size)
        self._offsets = np.arange(self.seq_len + 1)

    def starts(self, position: int) -> np.ndarray:
        """Window start offsets of batch number ``position``."""
        rng = np.random.default_rng([self.seed, self.rank, position])
        return rng.integers(0, len(self._tokens) - self.seq_len, size=self.batch_size)

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(input_ids, targets)``, LongTensors ``[batch_size, seq_len]`` (this shard's rows with
        ``shard``), targets shifted by 1."""
        windows = self._tokens[self.starts(self.position)[self._rows, None] + self._offsets]
        self.position += 1
        return _to_long(windows[:, :-1]), _to_long(windows[:, 1:])

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        while True:
            yield self.next_batch()

    def state_dict(self) -> dict[str, int]:
        return {"seed": self.seed, "position": self.position}

    def load_state_dict(self, state: Mapping[str, int]) -> None:
        self.seed = int(state["seed"])
        self.position = int(state["position"])


def iter_eval_batches(
    dataset: TokenDataset, split: str, seq_len: int, batch_size: int, max_batches: int | None = None
) -> Iterator[dict[str, torch.Tensor]]:
    """Sequential, non-overlapping windows over a split (the last batch may be smaller).

    Window ``i`` predicts tokens ``i*L+1 .. i*L+L``, so targets tile the split exactly once up to
    the last full window. ``domain_ids`` are those of the *target* tokens, for per-domain losses.
    """
    tokens = _check_window(dataset, split, seq_len, batch_size)
    domains = dataset.domain_ids(split)
    n_windows = (len(tokens) - 1) // seq_len
    offsets = np.arange(seq_len + 1)
    for b, first in enumerate(range(0, n_windows, batch_size)):
        if max_batches is not None and b >= max_batches:
            return
        idx = (np.arange(first, min(first + batch_size, n_windows)) * seq_len)[:, None] + offsets
        windows = tokens[idx]
        yield {
            "input_ids": _to_long(windows[:, :-1]),
            "targets": _to_long(windows[:, 1:]),
            "domain_ids": _to_long(domains[idx[:, 1:]]),
        }
