"""The dataset checksum: the same data prepared in two folders (from two checkouts) has one
checksum, other data another; kept in the per-user cache with the same digest as computing it,
recomputed when a file changes, and a broken cache costs only the hashing."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from moelab import provenance
from moelab.data import dataset_checksum, prepare
from moelab.data.default import CHECKSUMS
from moelab.data.tokenizer import SHIPPED_TOKENIZER


def _dataset(root: Path) -> Path:
    root.mkdir()
    (root / "meta.json").write_text('{"domains": ["a"]}')
    (root / "train.bin").write_bytes(bytes(range(256)) * 10)
    return root


def _by_hand(root: Path) -> str:
    h = hashlib.sha256()
    meta = json.loads((root / "meta.json").read_text())  # hashed as sorted, compact JSON
    h.update(b"meta.json" + json.dumps(meta, sort_keys=True, separators=(",", ":")).encode())
    h.update(b"train.bin" + (root / "train.bin").read_bytes())
    return h.hexdigest()


def _prepare_in(checkout: Path, texts: dict[str, str], **kw) -> Path:
    """Prepare ``texts`` the way a user of a checkout at ``checkout`` would: inputs, tokenizer
    copy and output all under that folder."""
    corpus = checkout / "corpus"
    corpus.mkdir(parents=True)
    for name, text in texts.items():
        (corpus / name).write_text(text)
    tokenizer = checkout / "tok" / "tokenizer.json"
    tokenizer.parent.mkdir()
    tokenizer.write_bytes(SHIPPED_TOKENIZER.read_bytes())
    return prepare(corpus, checkout / "data", tokenizer=tokenizer, progress=False, **kw)


TEXTS = {f"doc{i}.txt": f"Document number {i} is about topic {i % 3}." for i in range(8)}


def test_same_data_prepared_in_two_folders_has_one_checksum(tmp_path, monkeypatch):
    _cache(monkeypatch, tmp_path / "cache")
    a = _prepare_in(tmp_path / "checkout-a", TEXTS)
    b = _prepare_in(tmp_path / "elsewhere" / "checkout-b", TEXTS)
    meta_a, meta_b = (json.loads((d / "meta.json").read_text()) for d in (a, b))
    assert meta_a["source"][0]["path"] != meta_b["source"][0]["path"]  # the paths do differ
    assert meta_a["tokenizer"] != meta_b["tokenizer"]
    for name in ("train.bin", "val.bin", "tokenizer.json"):
        assert (a / name).read_bytes() == (b / name).read_bytes()
    assert provenance.data_checksum(a) == provenance.data_checksum(b)
    assert dataset_checksum(a) == dataset_checksum(b)

    # ... while other tokens, another split or another domain name is other data
    other = dict(TEXTS, **{"doc0.txt": "Another first document."})
    c = _prepare_in(tmp_path / "c", other)
    d = _prepare_in(tmp_path / "d", TEXTS, seed=1)
    e = _prepare_in(tmp_path / "e", TEXTS, domain="news")
    sums = {provenance.data_checksum(x) for x in (a, c, d, e)}
    assert len(sums) == 4


def test_a_cached_checksum_of_the_older_rule_is_recomputed(tmp_path, monkeypatch):
    data, cache = _dataset(tmp_path / "data"), _cache(monkeypatch, tmp_path / "cache")
    dataset_checksum(data)
    entries = json.loads(cache.read_text())
    entries[str(data.resolve())].pop("version")  # as written before the checksum ignored paths
    entries[str(data.resolve())]["sha256"] = "0" * 64
    cache.write_text(json.dumps(entries))
    assert dataset_checksum(data) == _by_hand(data)


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
