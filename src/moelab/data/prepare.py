"""Tokenise documents into flat token shards (``train``/``val``) that training reads by memmap.

Layout of a prepared directory (see ``docs/data.md``)::

    meta.json             vocab_size, dtype, domains, counts, tokenizer path + sha256, source
    tokenizer.json        a copy of the tokenizer used, so the directory is self-contained
    train.bin / val.bin   token ids, documents separated by the end-of-text token (uint16|uint32)
    train_domains.bin / val_domains.bin   one uint8 domain index per token

Why this shape: one flat array per split lets samplers take random windows with a single
memmap slice; the per-token domain array makes per-domain losses and routing analysis free.
The split is by document, stratified per domain and seeded, so every domain has held-out text.
Everything is written to a temporary directory first and renamed into place, so a reader never
sees a half-written dataset and concurrent builders cannot corrupt each other.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from moelab.checkpoint_io import listing
from moelab.data.sources import Document, Source, open_source
from moelab.data.tokenizer import TextTokenizer, load_tokenizer

FORMAT_VERSION = 1
SPLITS = ("train", "val")
DTYPES = ("auto", "uint16", "uint32")
PROGRESS_MIN_CHARS = 20_000_000  # show a progress bar automatically above this much text
_ENCODE_BATCH = 256


def token_file(split: str) -> str:
    return f"{split}.bin"


def domain_file(split: str) -> str:
    return f"{split}_domains.bin"


def choose_dtype(vocab_size: int, dtype: str = "auto") -> str:
    """Smallest unsigned dtype holding ids ``0..vocab_size-1`` (ValueError if ``dtype`` can't)."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype: unknown dtype {dtype!r} (allowed: {', '.join(DTYPES)})")
    if dtype == "auto":
        return "uint16" if vocab_size <= 65536 else "uint32"
    if dtype == "uint16" and vocab_size > 65536:
        raise ValueError(
            f"dtype: tokenizer vocab_size {vocab_size} does not fit uint16 "
            "(max 65536); use dtype uint32 or auto"
        )
    return dtype


def assign_splits(domains: Sequence[str], val_fraction: float, seed: int) -> np.ndarray:
    """Boolean "is validation" per document: round-half-up(fraction * n) documents of each domain.

    Every domain with at least two documents gets at least one validation and one training
    document; if that leaves validation empty, whole documents are drawn across domains.
    Deterministic in (domains, val_fraction, seed).
    """
    rng = np.random.default_rng(seed)
    labels = np.asarray(domains, dtype=object)
    is_val = np.zeros(len(labels), dtype=bool)
    for name in sorted(set(domains)):
        idx = np.flatnonzero(labels == name)
        if len(idx) < 2:
            continue
        n_val = min(max(1, int(val_fraction * len(idx) + 0.5)), len(idx) - 1)
        is_val[idx[rng.permutation(len(idx))[:n_val]]] = True
    if not is_val.any() and len(labels) >= 2:  # every domain has one document: hold out whole ones
        n_val = min(max(1, int(val_fraction * len(labels) + 0.5)), len(labels) - 1)
        is_val[rng.permutation(len(labels))[:n_val]] = True
    return is_val


def unigram_entropy(tokens: np.ndarray, vocab_size: int) -> float:
    """Entropy (nats/token) of the empirical unigram distribution: the loss of a bigram-free model.

    Training curves are judged against it: a model that learns anything beats this number.
    """
    if len(tokens) == 0:
        return 0.0
    counts = np.bincount(np.asarray(tokens), minlength=vocab_size).astype(np.float64)
    p = counts[counts > 0] / len(tokens)
    return float(-(p * np.log(p)).sum())


def _validate(
    inputs: Sequence[Path], output_dir: Path, val_fraction: float, seed: int, overwrite: bool
) -> None:
    if not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed: must be a non-negative integer, got {seed!r}")
    if not inputs:
        raise ValueError("inputs: at least one input path is required")
    if not isinstance(val_fraction, (int, float)) or not 0.0 < float(val_fraction) < 1.0:
        raise ValueError(f"val_fraction: must be strictly between 0 and 1, got {val_fraction!r}")
    for path in inputs:
        if not path.exists():
            raise ValueError(f"input {path}: no such file or directory")
    resolved = output_dir.resolve()
    for path in inputs:
        src = path.resolve()
        if src == resolved or resolved in src.parents:
            raise ValueError(
                f"output {output_dir}: holds the input {path}; write the dataset somewhere else"
            )
    if output_dir.exists():
        if not output_dir.is_dir():
            raise ValueError(f"output {output_dir}: exists and is not a directory")
        entries = {p.name for p in output_dir.iterdir()}
        if entries and not overwrite:
            raise ValueError(
                f"output {output_dir}: directory exists and is not empty "
                "(pass overwrite=True / --overwrite to replace it)"
            )
        if entries:
            _check_replaceable(output_dir, entries)


def dataset_entries() -> set[str]:
    """The names a prepared dataset directory consists of (what ``overwrite`` may replace)."""
    names = {"meta.json", "tokenizer.json"}
    return names | {f(split) for split in SPLITS for f in (token_file, domain_file)}


def _check_replaceable(output_dir: Path, entries: set[str]) -> None:
    """``overwrite`` replaces a prepared dataset and nothing else: a directory that is not one
    (no ``meta.json``: a run, a user's folder) or that also holds other files is refused, naming
    them, before any work and with nothing removed."""
    others = entries - dataset_entries()
    shown = listing(output_dir, others or entries)
    if "meta.json" not in entries:
        raise ValueError(
            f"output {output_dir}: --overwrite replaces only a prepared dataset (meta.json), and "
            f"this directory is not one (it holds {shown}); nothing was removed"
        )
    if others:
        raise ValueError(
            f"output {output_dir}: holds a dataset and also {shown}, which --overwrite would "
            "delete; nothing was removed: move them away or write to another directory"
        )


def _scan(sources: Sequence[Source]) -> tuple[list[str], int]:
    """First pass: validate every record and note each non-empty document's domain."""
    domains: list[str] = []
    chars = 0
    for source in sources:
        for doc in source:
            if doc.text.strip():
                domains.append(doc.domain)
                chars += len(doc.text)
    return domains, chars


def _publish(tmp: Path, output_dir: Path, overwrite: bool) -> None:
    """Rename ``tmp`` onto ``output_dir``; FileExistsError if another writer got there first."""
    if overwrite and output_dir.exists():
        trash = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.old-", dir=output_dir.parent))
        os.replace(output_dir, trash / "old")
        os.replace(tmp, output_dir)
        shutil.rmtree(trash, ignore_errors=True)
        return
    try:
        os.rename(tmp, output_dir)  # atomic; fails if output_dir exists and is not empty
    except OSError as err:
        shutil.rmtree(tmp, ignore_errors=True)
        raise FileExistsError(
            f"output {output_dir}: created concurrently by another process"
        ) from err


def prepare(
    inputs: str | Path | Sequence[str | Path],
    output_dir: str | Path,
    *,
    tokenizer: str | Path | TextTokenizer | None = None,
    format: str = "auto",
    text_field: str = "text",
    domain_field: str | None = "domain",
    domain: str = "default",
    domain_from_dir: bool = False,
    hf_split: str | None = None,
    val_fraction: float = 0.05,
    seed: int = 0,
    dtype: str = "auto",
    overwrite: bool = False,
    progress: bool | None = None,
    extensions: str | Sequence[str] | None = None,
) -> Path:
    """Tokenise ``inputs`` into a prepared dataset directory and return its path.

    ``inputs``: text files / directories of text files (one document per file; a directory gives
    its files whose names end with one of ``extensions``, default
    :data:`~moelab.data.sources.TEXT_EXTENSIONS`, and ``meta.json``'s ``source`` counts what was
    taken and skipped by extension), JSONL files (``text_field``, optional ``domain_field``), or
    ``datasets.save_to_disk`` directories.
    Documents without a domain get ``domain``. Each document is followed by the tokenizer's
    end-of-text token. All inputs are validated (ValueError) before any tokenisation.
    ``progress=None`` shows a bar only for large inputs.
    """
    paths = [Path(inputs)] if isinstance(inputs, (str, Path)) else [Path(p) for p in inputs]
    output_dir = Path(output_dir).expanduser()
    _validate(paths, output_dir, val_fraction, seed, overwrite)
    tok = tokenizer if isinstance(tokenizer, TextTokenizer) else load_tokenizer(tokenizer)
    np_dtype = choose_dtype(tok.vocab_size, dtype)
    if tok.eos_id is None:
        raise ValueError(
            f"tokenizer {tok.path}: no end-of-text token found (looked for "
            "<|endoftext|>, </s>, <eos>, ...); documents need a separator"
        )
    sources = [
        open_source(
            p,
            format,
            text_field=text_field,
            domain_field=domain_field,
            domain=domain,
            domain_from_dir=domain_from_dir,
            hf_split=hf_split,
            extensions=extensions,
        )
        for p in paths
    ]

    doc_domains, total_chars = _scan(sources)
    if not doc_domains:
        raise ValueError(f"inputs {[str(p) for p in paths]}: empty input, no non-empty documents")
    if len(doc_domains) < 2:
        raise ValueError("inputs: need at least 2 documents to hold out a validation split")
    names = sorted(set(doc_domains))
    if len(names) > 256:
        raise ValueError(f"domains: at most 256 distinct domains fit uint8, got {len(names)}")
    domain_index = {name: i for i, name in enumerate(names)}
    is_val = assign_splits(doc_domains, float(val_fraction), seed)

    output_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.tmp-", dir=output_dir.parent))
    try:
        counts = _tokenize_into(
            tmp, sources, tok, np_dtype, is_val, domain_index, total_chars, progress
        )
        meta = _build_meta(tmp, tok, np_dtype, names, counts, sources, val_fraction, seed)
        shutil.copyfile(tok.path, tmp / "tokenizer.json")
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n", "utf-8")
        os.chmod(tmp, 0o755)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _publish(tmp, output_dir, overwrite)
    return output_dir


def _tokenize_into(
    tmp: Path,
    sources: Sequence[Source],
    tok: TextTokenizer,
    dtype: str,
    is_val: np.ndarray,
    domain_index: dict[str, int],
    total_chars: int,
    progress: bool | None,
) -> dict[str, np.ndarray]:
    """Second pass: encode in batches and append to the split files; returns per-split counts."""
    show = total_chars >= PROGRESS_MIN_CHARS if progress is None else progress
    for split in SPLITS:
        (tmp / token_file(split)).touch()
        (tmp / domain_file(split)).touch()
    # counts[split][0, d] = documents, counts[split][1, d] = tokens of domain d
    counts = {s: np.zeros((2, len(domain_index)), dtype=np.int64) for s in SPLITS}
    eos = np.array([tok.eos_id], dtype=dtype)
    doc_no = 0
    batch: list[Document] = []

    def flush() -> None:
        nonlocal doc_no
        out: dict[str, tuple[list[np.ndarray], list[np.ndarray]]] = {s: ([], []) for s in SPLITS}
        for doc, ids in zip(batch, tok.encode_batch([d.text for d in batch]), strict=True):
            split = "val" if is_val[doc_no] else "train"
            doc_no += 1
            arr = np.concatenate([np.asarray(ids, dtype=dtype), eos])
            d = domain_index[doc.domain]
            out[split][0].append(arr)
            out[split][1].append(np.full(len(arr), d, dtype=np.uint8))
            counts[split][:, d] += (1, len(arr))
            bar.update(len(doc.text))
        for split, (token_arrays, domain_arrays) in out.items():
            if token_arrays:
                with open(tmp / token_file(split), "ab") as f:
                    f.write(np.concatenate(token_arrays).tobytes())
                with open(tmp / domain_file(split), "ab") as f:
                    f.write(np.concatenate(domain_arrays).tobytes())
        batch.clear()

    with tqdm(
        total=total_chars, unit="char", unit_scale=True, desc="tokenizing", disable=not show
    ) as bar:
        for source in sources:
            for doc in source:
                if doc.text.strip():
                    batch.append(doc)
                    if len(batch) >= _ENCODE_BATCH:
                        flush()
        flush()
    return counts


def _build_meta(
    tmp: Path,
    tok: TextTokenizer,
    dtype: str,
    names: list[str],
    counts: dict[str, np.ndarray],
    sources: Sequence[Source],
    val_fraction: float,
    seed: int,
) -> dict[str, Any]:
    import moelab

    entropy = {}
    for split in SPLITS:
        n = int(counts[split][1].sum())
        tokens = (
            np.memmap(tmp / token_file(split), dtype=dtype, mode="r")
            if n
            else np.zeros(0, dtype=dtype)
        )
        entropy[split] = round(unigram_entropy(tokens, tok.vocab_size), 6)
        del tokens
    return {
        "format": "moelab-tokens",
        "format_version": FORMAT_VERSION,
        "tokenizer": str(tok.path),
        "tokenizer_sha256": tok.sha256,
        "tokenizer_file": "tokenizer.json",
        "vocab_size": tok.vocab_size,
        "eos_id": tok.eos_id,
        "dtype": dtype,
        "domains": names,
        "files": {s: {"tokens": token_file(s), "domains": domain_file(s)} for s in SPLITS},
        "tokens": {s: int(counts[s][1].sum()) for s in SPLITS},
        "documents": {s: int(counts[s][0].sum()) for s in SPLITS},
        "tokens_by_domain": {
            s: {n: int(c) for n, c in zip(names, counts[s][1], strict=True)} for s in SPLITS
        },
        "documents_by_domain": {
            s: {n: int(c) for n, c in zip(names, counts[s][0], strict=True)} for s in SPLITS
        },
        "unigram_entropy_nats": entropy,
        "val_fraction": float(val_fraction),
        "seed": int(seed),
        "source": [s.describe() for s in sources],
        "created_with": f"moelab {moelab.__version__}",
    }
