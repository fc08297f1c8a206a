#!/usr/bin/env python3
"""Rebuild moelab's embedded default corpus and its BPE tokenizer from openly licensed local text.

Why a script: the shipped ``corpus.jsonl.gz`` and ``tokenizer.json`` must be reproducible by
anyone from the same sources, so every choice (which files, order, chunking, dedup, caps) lives
here and is deterministic: files are visited in a fixed pseudo-random order derived from their
relative paths (a hash, not ``random``), and gzip is written without a timestamp.

Sources (install with ``apt-get install -y fortunes fortunes-min dict-devil python3.11-doc``):

* ``prose``: Debian ``fortunes``/``fortunes-min`` (BSD) and ``dict-devil`` (Bierce, public domain)
* ``code``:  the running interpreter's standard library ``.py`` files (PSF licence)
* ``docs``:  reST sources of the Python documentation from Debian ``python3.11-doc`` (PSF licence)

Usage::

    python scripts/build_corpus.py            # writes src/moelab/data/corpus + tokenizer
    python scripts/build_corpus.py --no-tokenizer
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import json
import re
import sys
import sysconfig
import unicodedata
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA_DIR = REPO / "src" / "moelab" / "data"
FORTUNE_DIR = Path("/usr/share/games/fortunes")
DEVIL_DICT = Path("/usr/share/dictd/devil.dict.dz")
DEVIL_INDEX = Path("/usr/share/dictd/devil.index")
PYDOC_SOURCES = Path("/usr/share/doc/python3.11-doc/html/_sources")

MAX_CHARS = 4000  # documents longer than this are split into chunks at paragraph/line boundaries
MIN_CHARS = 80  # shorter documents carry almost no signal and are dropped
DOMAIN_CAP = 3_300_000  # characters per domain, keeps the domains balanced (~10 MB in total)

# Fortune files that are pictures rather than prose.
FORTUNE_SKIP = {"ascii-art"}
# Standard-library folders that are tests, generated tables or vendored data rather than code.
STDLIB_SKIP_PARTS = {
    "site-packages",
    "test",
    "tests",
    "idle_test",
    "encodings",
    "__pycache__",
    "pydoc_data",
    "ensurepip",
    "lib2to3",
    "config-3.11-x86_64-linux-gnu",
}
# Documentation pages that are changelogs / bug-number lists rather than prose documentation.
PYDOC_SKIP = {"whatsnew/changelog.rst.txt"}
# Period texts contain a few slurs; units that contain one are dropped.
BLOCKLIST = re.compile(r"\bnigger", re.IGNORECASE)

_OVERSTRIKE = re.compile(r".\x08")
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")


@dataclass(frozen=True)
class Doc:
    text: str
    domain: str
    source: str


def clean(text: str) -> str:
    """Normalise a unit of text: NFC, no overstrike/control characters, no trailing spaces."""
    text = unicodedata.normalize("NFC", text.replace("\r\n", "\n"))
    text = _CONTROL.sub("", _OVERSTRIKE.sub("", text))
    lines = [line.rstrip() for line in text.split("\n")]
    return "\n".join(lines).strip("\n")


def path_order(key: str) -> str:
    """A fixed pseudo-random order over paths, so capped domains sample all sub-areas."""
    return hashlib.sha256(key.encode()).hexdigest()


def split_long(unit: str, max_chars: int) -> list[str]:
    """Split a single over-long unit at line boundaries (hard-splitting over-long lines)."""
    pieces: list[str] = []
    current = ""
    for line in unit.split("\n"):
        while len(line) > max_chars:
            pieces.append(line[:max_chars])
            line = line[max_chars:]
        if current and len(current) + 1 + len(line) > max_chars:
            pieces.append(current)
            current = line
        else:
            current = f"{current}\n{line}" if current else line
    if current:
        pieces.append(current)
    return pieces


def pack(units: Iterable[str], max_chars: int = MAX_CHARS, sep: str = "\n\n") -> list[str]:
    """Greedily pack consecutive units (paragraphs, fortunes, entries) into chunks <= max_chars."""
    chunks: list[str] = []
    current = ""
    for unit in units:
        for piece in [unit] if len(unit) <= max_chars else split_long(unit, max_chars):
            if current and len(current) + len(sep) + len(piece) > max_chars:
                chunks.append(current)
                current = piece
            else:
                current = f"{current}{sep}{piece}" if current else piece
    if current:
        chunks.append(current)
    return chunks


def paragraphs(text: str) -> list[str]:
    return [p for p in re.split(r"\n\s*\n", text) if p.strip()]


def fortune_docs() -> Iterator[Doc]:
    seen: set[str] = set()
    files = sorted(
        p
        for p in FORTUNE_DIR.iterdir()
        if p.is_file() and not p.is_symlink() and "." not in p.name and p.name not in FORTUNE_SKIP
    )
    for path in files:
        units = []
        for raw in path.read_text("utf-8", errors="replace").split("\n%\n"):
            unit = clean(raw.strip("%"))
            key = " ".join(unit.split())
            if not unit or key in seen or BLOCKLIST.search(unit) or "\ufffd" in unit:
                continue
            seen.add(key)
            units.append(unit)
        for i, chunk in enumerate(pack(units)):
            yield Doc(chunk, "prose", f"fortunes:{path.name}#{i}")


def _dictd_b64(s: str) -> int:
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
    value = 0
    for ch in s:
        value = value * 64 + alphabet.index(ch)
    return value


def devil_docs() -> Iterator[Doc]:
    body = gzip.decompress(DEVIL_DICT.read_bytes())
    spans = set()
    for line in DEVIL_INDEX.read_text("utf-8").splitlines():
        head, off, length = line.split("\t")
        if head.startswith("00database") and head != "00databaseinfo":
            continue
        spans.add((_dictd_b64(off), _dictd_b64(length)))
    units = []
    for off, length in sorted(spans):
        unit = clean(body[off : off + length].decode("utf-8", errors="replace"))
        if unit and not BLOCKLIST.search(unit):
            units.append(unit)
    for i, chunk in enumerate(pack(units)):
        yield Doc(chunk, "prose", f"dict-devil#{i}")


def stdlib_docs() -> Iterator[Doc]:
    root = Path(sysconfig.get_paths()["stdlib"])
    files = [
        p
        for p in root.rglob("*.py")
        if not STDLIB_SKIP_PARTS.intersection(p.relative_to(root).parts)
    ]
    tag = f"cpython-{sys.version_info.major}.{sys.version_info.minor}.{sys.version_info.micro}"
    for path in sorted(files, key=lambda p: path_order(p.relative_to(root).as_posix())):
        rel = path.relative_to(root).as_posix()
        try:
            text = clean(path.read_text("utf-8"))
        except UnicodeDecodeError:
            continue
        for i, chunk in enumerate(pack(paragraphs(text), sep="\n\n")):
            yield Doc(chunk, "code", f"{tag}:Lib/{rel}#{i}")


def pydoc_docs() -> Iterator[Doc]:
    files = [p for p in PYDOC_SOURCES.rglob("*.rst.txt")]
    for path in sorted(files, key=lambda p: path_order(p.relative_to(PYDOC_SOURCES).as_posix())):
        rel = path.relative_to(PYDOC_SOURCES).as_posix()
        if rel in PYDOC_SKIP:
            continue
        text = clean(path.read_text("utf-8", errors="replace"))
        for i, chunk in enumerate(pack(paragraphs(text))):
            yield Doc(chunk, "docs", f"python3.11-doc:{rel.removesuffix('.txt')}#{i}")


def collect(sources: list[Iterator[Doc]], cap: int) -> list[Doc]:
    """Deduplicate (whitespace-insensitive) and keep documents until the domain's cap is hit."""
    seen: set[str] = set()
    kept: list[Doc] = []
    total = 0
    for source in sources:
        for doc in source:
            key = hashlib.sha256(" ".join(doc.text.split()).encode()).hexdigest()
            if len(doc.text) < MIN_CHARS or key in seen:
                continue
            if total + len(doc.text) > cap:
                return kept
            seen.add(key)
            kept.append(doc)
            total += len(doc.text)
    return kept


def write_corpus(docs: list[Doc], path: Path) -> bytes:
    buf = io.BytesIO()
    with gzip.GzipFile(fileobj=buf, mode="wb", compresslevel=9, mtime=0, filename="") as gz:
        for doc in docs:
            record = {"text": doc.text, "domain": doc.domain, "source": doc.source}
            gz.write((json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8"))
    data = buf.getvalue()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return data


SOURCES_TABLE = [
    (
        "prose",
        "Debian `fortunes`, `fortunes-min` (`/usr/share/games/fortunes`; `ascii-art` "
        "skipped; the offensive set is not used)",
        "1:1.99.1-7.3",
        "BSD (Debian package copyright file); quotations carry their attributions",
    ),
    (
        "prose",
        "Debian `dict-devil`: Ambrose Bierce, *The Devil's Dictionary* (1911)",
        "1.0-13.1",
        "public domain",
    ),
    (
        "code",
        "CPython standard library `.py` files of the building interpreter (tests, "
        "`encodings`, `lib2to3`, `pydoc_data`, `ensurepip`, `site-packages` skipped)",
        "{python}",
        "PSF License Agreement",
    ),
    (
        "docs",
        "reST sources of the Python documentation, Debian `python3.11-doc` "
        "(`html/_sources/**/*.rst.txt`; the changelog skipped)",
        "3.11.2",
        "PSF License Agreement",
    ),
]

MANIFEST_HEAD = """# moelab embedded default corpus

`corpus.jsonl.gz`: one JSON object per line with `text`, `domain` and `source`
(`<origin>:<file>#<chunk>`). Rebuild it (and the tokenizer in `../tokenizer/`) with
`python scripts/build_corpus.py`; the build is deterministic for the same source packages.
Documents are cleaned (NFC, no overstrike/control characters), deduplicated
(whitespace-insensitive, exact), packed/split to at most {max_chars} characters at paragraph or
line boundaries, documents under {min_chars} characters dropped, and each domain capped at
{cap:,} characters so the domains stay balanced. Units containing racial slurs (present in the
1900s Devil's Dictionary) are dropped.

## Sources and licences

| domain | source | version | licence |
|---|---|---|---|
{sources}

Capped domains (code, docs) take whole files in a fixed pseudo-random order (sha256 of the
relative path), so the sample spans the whole library / documentation tree.

## Contents

| domain | documents | characters | UTF-8 bytes |
|---|---:|---:|---:|
"""


def write_manifest(docs: list[Doc], compressed: bytes, path: Path) -> str:
    stats: dict[str, list[int]] = {}
    for doc in docs:
        s = stats.setdefault(doc.domain, [0, 0, 0])
        s[0] += 1
        s[1] += len(doc.text)
        s[2] += len(doc.text.encode("utf-8"))
    python = f"{sys.version_info.major}.{sys.version_info.minor}.{sys.version_info.micro}"
    sources = "\n".join("| " + " | ".join(row) + " |" for row in SOURCES_TABLE)
    text = MANIFEST_HEAD.format(
        max_chars=MAX_CHARS,
        min_chars=MIN_CHARS,
        cap=DOMAIN_CAP,
        sources=sources.replace("{python}", python),
    )
    for domain, (n, chars, nbytes) in stats.items():
        text += f"| {domain} | {n:,} | {chars:,} | {nbytes:,} |\n"
    total = [sum(s[i] for s in stats.values()) for i in range(3)]
    text += f"| **total** | {total[0]:,} | {total[1]:,} | {total[2]:,} |\n\n"
    text += (
        f"Compressed size: {len(compressed):,} bytes; "
        f"sha256 `{hashlib.sha256(compressed).hexdigest()}`.\n"
    )
    path.write_text(text, "utf-8")
    return text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DATA_DIR, help="moelab/data directory")
    parser.add_argument("--no-tokenizer", action="store_true", help="skip tokenizer training")
    parser.add_argument("--vocab-size", type=int, default=8192)
    args = parser.parse_args(argv)
    for needed in (FORTUNE_DIR, DEVIL_DICT, PYDOC_SOURCES):
        if not needed.exists():
            parser.error(
                f"{needed} is missing: apt-get install -y fortunes fortunes-min "
                "dict-devil python3.11-doc"
            )

    docs = (
        collect([fortune_docs(), devil_docs()], DOMAIN_CAP)
        + collect([stdlib_docs()], DOMAIN_CAP)
        + collect([pydoc_docs()], DOMAIN_CAP)
    )
    corpus_path = args.out / "corpus" / "corpus.jsonl.gz"
    compressed = write_corpus(docs, corpus_path)
    print(write_manifest(docs, compressed, args.out / "corpus" / "MANIFEST.md"))

    if not args.no_tokenizer:
        sys.path.insert(0, str(REPO / "src"))
        from moelab.data.tokenizer import train_tokenizer

        out = args.out / "tokenizer" / "tokenizer.json"
        train_tokenizer((d.text for d in docs), out, vocab_size=args.vocab_size)
        print(f"tokenizer: {out} ({out.stat().st_size:,} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
