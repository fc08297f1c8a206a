"""Loading a trained run and running the routing-collection pass over its validation data.

This is the only analysis module that touches the training library (``moelab.train.load_run``) and
the run's configuration; everything downstream works on
:class:`~moelab.analysis.collect.RoutingTrace`.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from moelab.analysis.collect import RoutingTrace, collect_routing
from moelab.data import TokenDataset, check_vocab_compatible, iter_eval_batches
from moelab.rundir import RunDir
from moelab.train import load_run, open_dataset


@dataclass
class EvalSettings:
    """Which validation tokens a per-token analysis reads (the same for every compared run)."""

    dataset: str | None = None  # prepared dataset directory; None: the run's, else the default
    split: str = "val"
    seq_len: int | None = None  # None: the run's training sequence length (capped by the model)
    batch_size: int | None = None  # None: the run's data.eval_batch_size
    max_batches: int | None = 16


def _get(obj: Any, dotted: str) -> Any:
    """``a.b.c`` from nested dataclasses / dicts; None when any part is missing."""
    for part in dotted.split("."):
        if obj is None:
            return None
        obj = obj.get(part) if isinstance(obj, Mapping) else getattr(obj, part, None)
    return obj


def load_model(run_dir: str | Path, checkpoint: str | Path | None = None) -> tuple[nn.Module, Any]:
    """``moelab.train.load_run``, refusing (naming the run) a run with no checkpoint."""
    if not RunDir(run_dir).checkpoints():
        raise ValueError(
            f"{run_dir}: no {RunDir.CHECKPOINTS}/{RunDir.STEP_PREFIX}* directory, so no model to "
            "analyse"
        )
    return load_run(run_dir, checkpoint=checkpoint)


def open_eval_dataset(run_config: Any, settings: EvalSettings, run_dir: str | Path) -> Any:
    """The prepared dataset to read: the explicit setting, else the run's own (``data.path``, or
    the embedded corpus when null, via ``moelab.train.open_dataset``). A dataset tokenised with
    another tokenizer than the run's is refused (its per-token numbers would be meaningless)."""
    ds = TokenDataset(settings.dataset) if settings.dataset else open_dataset(run_config)
    RunDir(run_dir).check_same_tokenizer(ds, field="--dataset")
    return ds


def tokenizer_id(run_dir: str | Path, ds: Any) -> str:
    """What identifies a run's token ids: its tokenizer copy's hash, else its dataset's one."""
    own = RunDir(run_dir).tokenizer_sha256()
    if own:
        return f"sha256:{own[:12]}"
    sha = ds.meta.get("tokenizer_sha256")
    return f"sha256:{sha[:12]}" if sha else str(ds.meta.get("tokenizer"))


def model_vocab_size(model: nn.Module) -> int:
    cfg = getattr(model, "cfg", None)
    if cfg is not None and getattr(cfg, "vocab_size", None):
        return int(cfg.vocab_size)
    emb = getattr(model, "tok_emb", None)
    if emb is not None:
        return int(emb.num_embeddings)
    raise ValueError("cannot tell the model's vocabulary size")


def check_same_vocab(entries: list[tuple[str, int, str]]) -> None:
    """Per-token analyses compare runs on the same validation tokens, so every run must read the
    same token ids: ``entries`` are ``(run_dir, model_vocab_size, tokenizer_id)``. Raises
    ValueError naming the first run that disagrees with the first one, and why."""
    if not entries:
        return
    ref_dir, ref_vocab, ref_tok = entries[0]
    for run_dir, vocab, tok in entries[1:]:
        if vocab != ref_vocab or tok != ref_tok:
            raise ValueError(
                f"{run_dir}: vocabulary (size {vocab}, tokenizer {tok}) differs from {ref_dir} "
                f"(size {ref_vocab}, tokenizer {ref_tok}); per-token analyses compare runs on the "
                "same validation tokens - report these runs separately, or without per-token "
                "analysis (--no-analysis)"
            )


def run_eval_pass(
    model: nn.Module, run_config: Any, settings: EvalSettings, run_dir: str | Path = "?"
) -> tuple[RoutingTrace, Any]:
    """Collect the routing trace of ``model`` over the settings' validation windows. Returns the
    trace and the :class:`moelab.data.TokenDataset` read."""
    ds = open_eval_dataset(run_config, settings, run_dir)
    try:
        check_vocab_compatible(ds, model_vocab_size(model))
    except ValueError as err:
        raise ValueError(f"{run_dir}: cannot analyse on {ds.path}: {err}") from err
    max_len = int(getattr(getattr(model, "cfg", None), "max_seq_len", 1 << 30))
    seq_len = settings.seq_len or _get(run_config, "data.seq_len") or min(max_len, 256)
    seq_len = min(int(seq_len), max_len)
    batch_size = settings.batch_size or _get(run_config, "data.eval_batch_size") or 8
    batches = spread_eval_batches(
        ds, settings.split, seq_len, int(batch_size), settings.max_batches
    )
    return collect_routing(model, batches, domains=ds.domains), ds


def spread_eval_batches(
    ds: Any, split: str, seq_len: int, batch_size: int, max_batches: int | None
) -> Iterator[dict[str, torch.Tensor]]:
    """Non-overlapping windows like :func:`moelab.data.iter_eval_batches`, but when only
    ``max_batches`` batches are read they are spread evenly over the whole split instead of taken
    from its start: splits are stored domain by domain, so the first windows would all come from
    one domain and the domain analysis would see nothing. Deterministic (no randomness)."""
    tokens = ds.split(split)
    n_windows = (len(tokens) - 1) // seq_len
    if max_batches is None or max_batches * batch_size >= n_windows:
        yield from iter_eval_batches(ds, split, seq_len, batch_size, max_batches)
        return
    domains = ds.domain_ids(split)
    chosen = np.linspace(0, n_windows - 1, max_batches * batch_size).round().astype(np.int64)
    offsets = np.arange(seq_len + 1)
    for b in range(max_batches):
        idx = chosen[b * batch_size : (b + 1) * batch_size, None] * seq_len + offsets
        windows = torch.from_numpy(np.asarray(tokens[idx], dtype=np.int64))
        yield {
            "input_ids": windows[:, :-1],
            "targets": windows[:, 1:],
            "domain_ids": torch.from_numpy(np.asarray(domains[idx[:, 1:]], dtype=np.int64)),
        }


def train_token_counts(ds: Any) -> np.ndarray:
    """Occurrences of each id in the training split (for the rare-vs-frequent analysis)."""
    return np.bincount(np.asarray(ds.split("train"), dtype=np.int64), minlength=ds.vocab_size)
