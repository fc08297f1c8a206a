"""Readers that turn user inputs (text files, JSONL, local HF datasets) into labelled documents.

Why separate from :mod:`moelab.data.prepare`: format detection and validation must happen before
any tokenisation work, and each reader must be re-iterable (prepare makes a cheap counting pass,
then a tokenising pass), so every source here is a small object that can be iterated twice.
"""

from __future__ import annotations

import gzip
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

FORMATS = ("auto", "text", "jsonl", "hf")
TEXT_SUFFIXES = (".txt",)
JSONL_SUFFIXES = (".jsonl", ".jsonl.gz", ".ndjson")
HF_MARKERS = ("dataset_info.json", "state.json", "dataset_dict.json")


@dataclass(frozen=True)
class Document:
    text: str
    domain: str


@dataclass
class TextSource:
    """One document per ``.txt`` file: a single file, or every ``.txt`` under a directory."""

    path: Path
    domain: str
    domain_from_dir: bool = False
    files: list[Path] = field(init=False)

    def __post_init__(self) -> None:
        if self.path.is_dir():
            self.files = sorted(p for p in self.path.rglob("*") if p.is_file()
                                and p.name.endswith(TEXT_SUFFIXES))
            if not self.files:
                raise ValueError(f"input {self.path}: empty input, no .txt files in this directory")
        else:
            self.files = [self.path]

    def _domain(self, file: Path) -> str:
        if self.domain_from_dir and self.path.is_dir():
            parts = file.relative_to(self.path).parts
            if len(parts) > 1:
                return parts[0]
        return self.domain

    def __iter__(self) -> Iterator[Document]:
        for file in self.files:
            try:
                text = file.read_text("utf-8")
            except UnicodeDecodeError as err:
                raise ValueError(f"input {file}: not UTF-8 text ({err})") from err
            yield Document(text, self._domain(file))

    def describe(self) -> dict[str, Any]:
        return {"path": str(self.path), "format": "text", "files": len(self.files)}


@dataclass
class JsonlSource:
    """One JSON object per line with a text field and an optional domain field (``.gz`` ok)."""

    path: Path
    text_field: str
    domain_field: str | None
    domain: str

    def _lines(self) -> Iterator[str]:
        opener = gzip.open if self.path.name.endswith(".gz") else open
        with opener(self.path, "rt", encoding="utf-8") as f:
            yield from f

    def __iter__(self) -> Iterator[Document]:
        for lineno, line in enumerate(self._lines(), start=1):
            if not line.strip():
                continue
            where = f"input {self.path} line {lineno}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{where}: not valid JSON ({err.msg})") from err
            if not isinstance(record, dict):
                raise ValueError(f"{where}: expected a JSON object, got {type(record).__name__}")
            if self.text_field not in record:
                raise ValueError(
                    f"{where}: missing text field {self.text_field!r} "
                    f"(fields present: {sorted(record)}; choose one with --text-field)"
                )
            text = record[self.text_field]
            if not isinstance(text, str):
                raise ValueError(f"{where}: field {self.text_field!r} must be a string, "
                                 f"got {type(text).__name__}")
            domain = self.domain
            if self.domain_field and record.get(self.domain_field) is not None:
                domain = str(record[self.domain_field])
            yield Document(text, domain)

    def describe(self) -> dict[str, Any]:
        return {"path": str(self.path), "format": "jsonl", "text_field": self.text_field,
                "domain_field": self.domain_field}


@dataclass
class HFSource:
    """A dataset saved with ``datasets.save_to_disk`` (``datasets`` is an optional dependency)."""

    path: Path
    text_field: str
    domain_field: str | None
    domain: str
    split: str | None = None

    def __post_init__(self) -> None:
        try:
            import datasets
        except ImportError as err:
            raise ValueError(
                f"input {self.path}: reading a Hugging Face dataset directory needs the optional "
                "'datasets' package (pip install datasets); or export it to JSONL"
            ) from err
        ds = datasets.load_from_disk(str(self.path))
        if isinstance(ds, datasets.DatasetDict):
            names = list(ds)
            split = self.split or ("train" if "train" in ds else names[0])
            if split not in ds:
                raise ValueError(f"input {self.path}: split {split!r} not found (allowed: {names})")
            ds = ds[split]
            self.split = split
        if self.text_field not in ds.column_names:
            raise ValueError(f"input {self.path}: missing text field {self.text_field!r} "
                             f"(columns: {ds.column_names}; choose one with --text-field)")
        self._ds = ds

    def __iter__(self) -> Iterator[Document]:
        has_domain = bool(self.domain_field) and self.domain_field in self._ds.column_names
        columns = [self.text_field] + ([self.domain_field] if has_domain else [])
        for batch in self._ds.select_columns(columns).iter(batch_size=1000):
            domains = batch[self.domain_field] if has_domain else None
            for i, text in enumerate(batch[self.text_field]):
                if not isinstance(text, str):
                    raise ValueError(f"input {self.path}: column {self.text_field!r} must hold "
                                     f"strings, got {type(text).__name__}")
                domain = self.domain if domains is None or domains[i] is None else str(domains[i])
                yield Document(text, domain)

    def describe(self) -> dict[str, Any]:
        return {"path": str(self.path), "format": "hf", "split": self.split,
                "text_field": self.text_field, "domain_field": self.domain_field}


Source = TextSource | JsonlSource | HFSource


def detect_format(path: Path) -> str:
    """Guess ``text``/``jsonl``/``hf`` from the path (ValueError when it cannot tell)."""
    if path.is_dir():
        if any((path / marker).is_file() for marker in HF_MARKERS):
            return "hf"
        return "text"
    name = path.name.lower()
    if name.endswith(JSONL_SUFFIXES):
        return "jsonl"
    if name.endswith(TEXT_SUFFIXES):
        return "text"
    raise ValueError(
        f"input {path}: unknown format (allowed: .txt files or directories of them, "
        f"{', '.join(JSONL_SUFFIXES)} files, a datasets.save_to_disk directory; "
        "or pass --format text|jsonl|hf)"
    )


def open_source(
    path: str | Path,
    fmt: str = "auto",
    *,
    text_field: str = "text",
    domain_field: str | None = "domain",
    domain: str = "default",
    domain_from_dir: bool = False,
    hf_split: str | None = None,
) -> Source:
    """Validate one input path and return a re-iterable source of :class:`Document`."""
    if fmt not in FORMATS:
        raise ValueError(f"format: unknown format {fmt!r} (allowed: {', '.join(FORMATS)})")
    p = Path(path).expanduser()
    if not p.exists():
        raise ValueError(f"input {path}: no such file or directory")
    if fmt == "auto":
        fmt = detect_format(p)
    if fmt == "text":
        return TextSource(p, domain, domain_from_dir)
    if p.is_dir() and fmt == "jsonl":
        raise ValueError(f"input {path}: format jsonl needs a file, got a directory")
    if fmt == "jsonl":
        return JsonlSource(p, text_field, domain_field, domain)
    if not p.is_dir():
        raise ValueError(f"input {path}: format hf needs a datasets.save_to_disk directory")
    return HFSource(p, text_field, domain_field, domain, hf_split)
