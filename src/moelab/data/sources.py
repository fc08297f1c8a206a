"""Readers that turn user inputs (text files, JSONL, local HF datasets) into labelled documents.

Why separate from :mod:`moelab.data.prepare`: format detection and validation must happen before
any tokenisation work, and each reader must be re-iterable (prepare makes a cheap counting pass,
then a tokenising pass), so every source here is a small object that can be iterated twice.
"""

from __future__ import annotations

import gzip
import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

FORMATS = ("auto", "text", "jsonl", "hf")
TEXT_EXTENSIONS = (
    # prose and markup
    ".txt",
    ".text",
    ".md",
    ".markdown",
    ".rst",
    ".adoc",
    ".org",
    ".tex",
    ".bib",
    ".html",
    ".htm",
    ".xml",
    ".svg",
    ".css",
    # code
    ".py",
    ".pyi",
    ".pyx",
    ".c",
    ".h",
    ".cc",
    ".cpp",
    ".cxx",
    ".hh",
    ".hpp",
    ".hxx",
    ".cu",
    ".java",
    ".kt",
    ".scala",
    ".go",
    ".rs",
    ".js",
    ".jsx",
    ".mjs",
    ".ts",
    ".tsx",
    ".cs",
    ".swift",
    ".m",
    ".rb",
    ".php",
    ".pl",
    ".lua",
    ".r",
    ".jl",
    ".hs",
    ".ml",
    ".ex",
    ".erl",
    ".clj",
    ".sql",
    ".sh",
    ".bash",
    ".zsh",
    ".fish",
    ".ps1",
    ".bat",
    ".mk",
    ".cmake",
    # data and configuration written as text
    ".json",
    ".yaml",
    ".yml",
    ".toml",
    ".ini",
    ".cfg",
    ".conf",
    ".csv",
    ".tsv",
    ".proto",
)
"""Files a directory input reads by default (one document each), compared case-insensitively:
common prose, markup, code and text-configuration files. Not JSONL: a ``.jsonl`` file holds
records, so pass it as an input of its own (or name it in ``extensions``)."""
JSONL_SUFFIXES = (".jsonl", ".jsonl.gz", ".ndjson")
NO_EXTENSION = "(none)"
HF_MARKERS = ("dataset_info.json", "state.json", "dataset_dict.json")


@dataclass(frozen=True)
class Document:
    text: str
    domain: str


def normalize_extensions(extensions: str | Sequence[str] | None) -> tuple[str, ...]:
    """``".py,.md"`` / ``["py", ".MD"]`` → ``(".py", ".md")``; None → :data:`TEXT_EXTENSIONS`."""
    if extensions is None:
        return TEXT_EXTENSIONS
    items = extensions.split(",") if isinstance(extensions, str) else list(extensions)
    out = []
    for item in items:
        ext = str(item).strip().lower()
        if ext and not ext.startswith("."):
            ext = "." + ext
        if len(ext) > 1 and ext not in out:
            out.append(ext)
    if not out:
        raise ValueError(
            f"extensions: give at least one file extension, e.g. .txt,.md; got {extensions!r}"
        )
    return tuple(out)


def _extension(file: Path) -> str:
    return file.suffix.lower() or NO_EXTENSION


def count_summary(counts: dict[str, int]) -> str:
    """``{".py": 250, ".md": 3}`` → ``".py 250, .md 3"`` (most frequent first)."""
    return ", ".join(f"{k} {v}" for k, v in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))


@dataclass
class TextSource:
    """One document per text file: a single file, or every file under a directory whose name ends
    with one of ``extensions`` (default :data:`TEXT_EXTENSIONS`).

    What a directory gave and what it skipped is counted by extension (``taken``, ``skipped``,
    ``hidden``: files under dot-directories such as ``.git``, never read), so that a whole kind of
    file cannot vanish unnoticed; ``moelab data prepare`` prints it and ``meta.json`` keeps it.
    """

    path: Path
    domain: str
    domain_from_dir: bool = False
    extensions: tuple[str, ...] = TEXT_EXTENSIONS
    files: list[Path] = field(init=False)
    taken: dict[str, int] = field(init=False, default_factory=dict)
    skipped: dict[str, int] = field(init=False, default_factory=dict)
    hidden: int = field(init=False, default=0)

    def __post_init__(self) -> None:
        if not self.path.is_dir():
            self.files = [self.path]
            self.taken = {_extension(self.path): 1}
            return
        self.files = []
        for file in sorted(p for p in self.path.rglob("*") if p.is_file()):
            if any(part.startswith(".") for part in file.relative_to(self.path).parts):
                self.hidden += 1
            elif file.name.lower().endswith(self.extensions):
                self.files.append(file)
                self.taken[_extension(file)] = self.taken.get(_extension(file), 0) + 1
            else:
                self.skipped[_extension(file)] = self.skipped.get(_extension(file), 0) + 1
        if not self.files:
            common = sorted(self.skipped, key=lambda e: (-self.skipped[e], e))
            example = [e for e in common if e != NO_EXTENSION][:2] or [".txt"]
            if not self.skipped:
                raise ValueError(f"input {self.path}: empty input, no files in this directory")
            raise ValueError(
                f"input {self.path}: no file with a text extension taken (skipped "
                f"{self.skipped_text()}); name the extensions to read with --extensions, e.g. "
                f"--extensions {','.join(example)}"
            )

    def skipped_text(self) -> str:
        """What was left out, by extension (and hidden files), as one phrase."""
        parts = [count_summary(self.skipped)] if self.skipped else []
        if self.hidden:
            parts.append(f"{self.hidden} under hidden directories")
        return "; ".join(parts) or "nothing"

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
                raise ValueError(  # not "drop its extension": that would drop every .txt
                    f"input {file}: not UTF-8 text (byte 0x{err.object[err.start]:02x} at "
                    f"offset {err.start}); convert it to UTF-8 (e.g. iconv -f latin1 -t utf-8) "
                    "or move it out of the input"
                ) from None
            yield Document(text, self._domain(file))

    def describe(self) -> dict[str, Any]:
        out: dict[str, Any] = {"path": str(self.path), "format": "text", "files": len(self.files)}
        if self.path.is_dir():
            out["files_by_extension"] = dict(sorted(self.taken.items()))
            out["skipped_by_extension"] = dict(sorted(self.skipped.items()))
            out["skipped_hidden"] = self.hidden
        return out


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
                raise ValueError(
                    f"{where}: field {self.text_field!r} must be a string, "
                    f"got {type(text).__name__}"
                )
            domain = self.domain
            if self.domain_field and record.get(self.domain_field) is not None:
                domain = str(record[self.domain_field])
            yield Document(text, domain)

    def describe(self) -> dict[str, Any]:
        return {
            "path": str(self.path),
            "format": "jsonl",
            "text_field": self.text_field,
            "domain_field": self.domain_field,
        }


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
            raise ValueError(
                f"input {self.path}: missing text field {self.text_field!r} "
                f"(columns: {ds.column_names}; choose one with --text-field)"
            )
        self._ds = ds

    def __iter__(self) -> Iterator[Document]:
        has_domain = bool(self.domain_field) and self.domain_field in self._ds.column_names
        columns = [self.text_field] + ([self.domain_field] if has_domain else [])
        for batch in self._ds.select_columns(columns).iter(batch_size=1000):
            domains = batch[self.domain_field] if has_domain else None
            for i, text in enumerate(batch[self.text_field]):
                if not isinstance(text, str):
                    raise ValueError(
                        f"input {self.path}: column {self.text_field!r} must hold "
                        f"strings, got {type(text).__name__}"
                    )
                domain = self.domain if domains is None or domains[i] is None else str(domains[i])
                yield Document(text, domain)

    def describe(self) -> dict[str, Any]:
        return {
            "path": str(self.path),
            "format": "hf",
            "split": self.split,
            "text_field": self.text_field,
            "domain_field": self.domain_field,
        }


Source = TextSource | JsonlSource | HFSource


def detect_format(path: Path, extensions: Sequence[str] = TEXT_EXTENSIONS) -> str:
    """Guess ``text``/``jsonl``/``hf`` from the path (ValueError when it cannot tell); a file is
    text when its name ends with one of ``extensions``."""
    if path.is_dir():
        if any((path / marker).is_file() for marker in HF_MARKERS):
            return "hf"
        return "text"
    name = path.name.lower()
    if name.endswith(JSONL_SUFFIXES):
        return "jsonl"
    if name.endswith(tuple(extensions)):
        return "text"
    raise ValueError(
        f"input {path}: unknown format (allowed: text files ({', '.join(extensions[:6])}, ...; "
        f"see --extensions) or directories of them, {', '.join(JSONL_SUFFIXES)} files, a "
        "datasets.save_to_disk directory; or pass --format text|jsonl|hf)"
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
    extensions: str | Sequence[str] | None = None,
) -> Source:
    """Validate one input path and return a re-iterable source of :class:`Document`.

    ``extensions`` (default :data:`TEXT_EXTENSIONS`): the files a directory of text files
    contributes, and the names a single file is recognised as text by."""
    if fmt not in FORMATS:
        raise ValueError(f"format: unknown format {fmt!r} (allowed: {', '.join(FORMATS)})")
    p = Path(path).expanduser()
    if not p.exists():
        raise ValueError(f"input {path}: no such file or directory")
    exts = normalize_extensions(extensions)
    if fmt == "auto":
        fmt = detect_format(p, exts)
    if fmt == "text":
        return TextSource(p, domain, domain_from_dir, exts)
    if p.is_dir() and fmt == "jsonl":
        raise ValueError(f"input {path}: format jsonl needs a file, got a directory")
    if fmt == "jsonl":
        return JsonlSource(p, text_field, domain_field, domain)
    if not p.is_dir():
        raise ValueError(f"input {path}: format hf needs a datasets.save_to_disk directory")
    return HFSource(p, text_field, domain_field, domain, hf_split)
