"""The embedded default corpus, tokenised once into a per-user cache on first use.

Why a cache keyed by content hashes: every command (train, eval, demo) can say "the default
data" without a download or a manual prepare step, and a new corpus, tokenizer or prepare format
automatically gets a fresh directory instead of silently reusing stale shards.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from moelab.checkpoint_io import replace_text
from moelab.data.prepare import FORMAT_VERSION, prepare
from moelab.data.tokenizer import SHIPPED_TOKENIZER, file_sha256
from moelab.provenance import CHECKSUM_VERSION, data_checksum

EMBEDDED_CORPUS = Path(__file__).resolve().parent / "corpus" / "corpus.jsonl.gz"
DEFAULT_VAL_FRACTION = 0.05
DEFAULT_SEED = 0


CHECKSUMS = "data-checksums.json"  # dataset_checksum's file in the cache directory


def cache_dir() -> Path:
    """``$MOELAB_CACHE`` if set, else ``~/.cache/moelab``."""
    return Path(os.environ.get("MOELAB_CACHE") or Path.home() / ".cache" / "moelab").expanduser()


def dataset_checksum(dataset_dir: Path) -> str | None:
    """:func:`moelab.provenance.data_checksum` of a prepared dataset, kept in the per-user cache
    (``data-checksums.json``) while every file keeps its name, size and modification time: a
    multi-GB dataset is hashed once, not at every run start. Entries of datasets that no longer
    exist are dropped, entries of an older checksum rule are recomputed; an unreadable or unwritable
    cache only costs the hashing."""
    files = sorted(p for p in Path(dataset_dir).glob("*") if p.is_file())
    stamp = [[p.name, p.stat().st_size, p.stat().st_mtime_ns] for p in files]
    cache_file, key = cache_dir() / CHECKSUMS, str(Path(dataset_dir).resolve())
    try:
        cache = json.loads(cache_file.read_text())
    except (OSError, ValueError):
        cache = {}
    cache = cache if isinstance(cache, dict) else {}
    entry = cache.get(key)
    fresh = isinstance(entry, dict) and entry.get("version") == CHECKSUM_VERSION
    if files and fresh and entry.get("stamp") == stamp:
        return entry["sha256"]
    checksum = data_checksum(dataset_dir)
    if checksum is not None:
        cache = {k: v for k, v in cache.items() if Path(k).is_dir()}
        cache[key] = {"stamp": stamp, "sha256": checksum, "version": CHECKSUM_VERSION}
        try:
            cache_file.parent.mkdir(parents=True, exist_ok=True)
            tmp = cache_file.with_name(f"{CHECKSUMS}.{os.getpid()}.tmp")
            replace_text(cache_file, json.dumps(cache), tmp)
        except OSError:
            pass
    return checksum


def embedded_key() -> str:
    """Short hash of everything that determines the prepared embedded dataset."""
    h = hashlib.sha256()
    for part in (
        file_sha256(EMBEDDED_CORPUS),
        file_sha256(SHIPPED_TOKENIZER),
        str(FORMAT_VERSION),
        str(DEFAULT_VAL_FRACTION),
        str(DEFAULT_SEED),
    ):
        h.update(part.encode() + b"\0")
    return h.hexdigest()[:12]


def default_dataset_dir() -> Path:
    """Path of the embedded corpus prepared with the shipped tokenizer (built on first use);
    ValueError naming ``MOELAB_CACHE`` when the cache cannot be written."""
    out = cache_dir() / "datasets" / f"embedded-{embedded_key()}"
    if (out / "meta.json").is_file():
        return out
    try:
        out.parent.mkdir(parents=True, exist_ok=True)  # fails here, before the tokenising
        prepare(
            EMBEDDED_CORPUS,
            out,
            format="jsonl",
            val_fraction=DEFAULT_VAL_FRACTION,
            seed=DEFAULT_SEED,
            progress=False,
        )
    except FileExistsError:  # another process published it while we were building
        if not (out / "meta.json").is_file():
            raise
    except OSError as err:  # a cache that is a file, read-only, full: say which and what to do
        raise ValueError(
            f"MOELAB_CACHE: cannot write the default dataset under {cache_dir()} "
            f"({err.strerror or err}{f': {err.filename}' if err.filename else ''}); set "
            "MOELAB_CACHE to a writable directory, or give a prepared dataset with data.path="
        ) from None
    return out
