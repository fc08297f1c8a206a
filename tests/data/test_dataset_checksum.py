"""The dataset checksum kept in the per-user cache: the same digest as computing it, recomputed
when a file changes, and a broken cache costs only the hashing."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from moelab import provenance
from moelab.data import dataset_checksum
from moelab.data.default import CHECKSUMS


def _dataset(root: Path) -> Path:
    root.mkdir()
    (root / "meta.json").write_text('{"domains": ["a"]}')
    (root / "train.bin").write_bytes(bytes(range(256)) * 10)
    return root


def _by_hand(root: Path) -> str:
    h = hashlib.sha256()
    for name in ("meta.json", "train.bin"):
        h.update(name.encode())
        h.update((root / name).read_bytes())
    return h.hexdigest()


def _cache(monkeypatch, root: Path) -> Path:
    monkeypatch.setenv("MOELAB_CACHE", str(root))
    return root / CHECKSUMS


def test_cached_checksum_is_reused_until_a_file_changes(tmp_path, monkeypatch):
    data, cache = _dataset(tmp_path / "data"), _cache(monkeypatch, tmp_path / "cache")
    assert dataset_checksum(data) == _by_hand(data) == provenance.data_checksum(data)
    assert json.loads(cache.read_text())[str(data.resolve())]["sha256"] == _by_hand(data)

    want, reads = _by_hand(data), []
    real_open = Path.open
    monkeypatch.setattr(
        Path, "open", lambda self, *a, **k: reads.append(self) or real_open(self, *a, **k)
    )
    assert dataset_checksum(data) == want
    assert not [p for p in reads if p.parent == data]  # from the cache: no dataset file read

    (data / "train.bin").write_bytes(bytes(range(255, -1, -1)) * 10)  # same size, new content
    stat = (data / "train.bin").stat()
    os.utime(data / "train.bin", ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))
    got = dataset_checksum(data)
    assert [p for p in reads if p.parent == data]  # changed: hashed again
    assert got == _by_hand(data) != want


def test_entries_of_deleted_datasets_are_dropped(tmp_path, monkeypatch):
    cache = _cache(monkeypatch, tmp_path / "cache")
    gone, kept = _dataset(tmp_path / "gone"), _dataset(tmp_path / "kept")
    dataset_checksum(gone)
    for path in gone.iterdir():
        path.unlink()
    gone.rmdir()
    dataset_checksum(kept)
    assert list(json.loads(cache.read_text())) == [str(kept.resolve())]


def test_a_corrupt_or_unwritable_cache_only_costs_the_hashing(tmp_path, monkeypatch):
    data = _dataset(tmp_path / "data")
    corrupt = _cache(monkeypatch, tmp_path / "cache")
    corrupt.parent.mkdir()
    corrupt.write_text("{not json")
    assert dataset_checksum(data) == _by_hand(data)
    (tmp_path / "file").write_text("")
    _cache(monkeypatch, tmp_path / "file")  # the cache directory is a file: cannot be written
    assert dataset_checksum(data) == _by_hand(data)
    assert dataset_checksum(tmp_path / "empty-dir-that-does-not-exist") is None
