"""The embedded default corpus, tokenised once into a per-user cache on first use.

Why a cache keyed by content hashes: every command (train, eval, demo) can say "the default
data" without a download or a manual prepare step, and a new corpus, tokenizer or prepare format
automatically gets a fresh directory instead of silently reusing stale shards.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from moelab.data.prepare import FORMAT_VERSION, prepare
from moelab.data.tokenizer import SHIPPED_TOKENIZER, file_sha256

EMBEDDED_CORPUS = Path(__file__).resolve().parent / "corpus" / "corpus.jsonl.gz"
DEFAULT_VAL_FRACTION = 0.05
DEFAULT_SEED = 0


def cache_dir() -> Path:
    """``$MOELAB_CACHE`` if set, else ``~/.cache/moelab``."""
    return Path(os.environ.get("MOELAB_CACHE") or Path.home() / ".cache" / "moelab").expanduser()


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
    """Path of the embedded corpus prepared with the shipped tokenizer (built on first use)."""
    out = cache_dir() / "datasets" / f"embedded-{embedded_key()}"
    if (out / "meta.json").is_file():
        return out
    try:
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
    return out
