"""Which directories a command may write, what ``--overwrite`` may remove, and the writer's lock.

Every command that writes a directory (``train``, ``demo``, ``convert-hf``, ``upcycle``,
``prune``, ``export-hf``) follows the same rules, so no command can lose a user's files:

* It writes only into a new directory, an empty one, or one it recognises as its own kind of
  output (a run directory; a ``transformers`` export): every entry is one of the names that kind
  of output consists of.
* ``--overwrite`` removes exactly those entries. A directory that also holds anything else (a
  user's ``notes/``) is refused, naming what was found, and nothing is removed.
* A prepared dataset (its ``meta.json``) is never taken for an output directory, even though it
  holds a ``tokenizer.json`` as a run does.
* The output is never the input (``export-hf runs/x runs/x``), nor a directory the input lies in.
* One process at a time writes a run directory: :class:`DirectoryLock` (``flock`` on a lock file
  holding the writer's pid). The operating system releases the lock when its process dies, so a
  lock file left by a killed run is simply taken over.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Collection
from pathlib import Path

from moelab.checkpoint_io import listing
from moelab.config import ConfigError

try:
    import fcntl
except ImportError:  # Windows: no flock; runs are not locked there
    fcntl = None  # type: ignore[assignment]

__all__ = ["DirectoryLock", "check_not_source", "clear_entries", "foreign_entries", "listing"]

DATASET_MARKER = "meta.json"  # what moelab.data.prepare writes into every dataset directory


def foreign_entries(
    path: Path,
    own: Collection[str],
    *,
    what: str,
    overwrite: bool,
    field: str,
    keep_hint: str = "",
) -> list[str]:
    """Check that ``path`` may receive an output made of the entries ``own`` (``what`` names
    it: "a run", "a transformers export"); returns the entries of an earlier output to remove
    (``[]`` for a new or empty directory). ConfigError on ``field``, nothing touched, when the
    directory is a dataset, holds anything else, or holds an earlier output without
    ``overwrite`` (``keep_hint``: how to use the earlier output instead, e.g. "continue it with
    --resume DIR")."""
    shown = repr(str(path))
    if path.exists() and not path.is_dir():
        raise ConfigError(field, f"{shown} is a file, not a directory")
    if not path.is_dir():
        return []
    entries = {p.name for p in path.iterdir()}
    if DATASET_MARKER in entries:
        raise ConfigError(
            field,
            f"{shown} is a prepared dataset ({DATASET_MARKER}), not an output directory; "
            "write to a new or empty directory",
        )
    others = entries - set(own)
    ours = sorted(entries & set(own) - {DirectoryLock.NAME})
    if others and not ours:
        raise ConfigError(
            field,
            f"{shown} is not empty and does not hold {what} (it holds {listing(path, others)}); "
            "write to a new or empty directory",
        )
    if ours and not overwrite:
        keep = f"{keep_hint} or " if keep_hint else ""
        raise ConfigError(field, f"{shown} already holds {what}; {keep}replace it with --overwrite")
    if others:
        raise ConfigError(
            field,
            f"{shown} holds {what} and also {listing(path, others)}, which are not part of it; "
            f"nothing was removed (only {what}'s own files are ever replaced): move them away "
            "or write to another directory",
        )
    return ours


def clear_entries(path: Path, names: Collection[str]) -> None:
    """Remove the entries ``names`` of ``path`` (files or directories), nothing else."""
    for name in names:
        entry = path / name
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink(missing_ok=True)


def check_not_source(out: str | Path, source: str | Path, *, field: str, source_field: str) -> None:
    """Refuse an output directory that is the input ``source`` or contains it (writing it would
    replace the input); one line naming both arguments."""
    out_p, src_p = Path(out).expanduser().resolve(), Path(source).expanduser().resolve()
    if out_p == src_p:
        raise ConfigError(
            field, f"{str(out)!r} is the same directory as {source_field}; write to another one"
        )
    if out_p in src_p.parents:
        raise ConfigError(
            field,
            f"{str(out)!r} contains {source_field} ({str(source)!r}); write to another directory",
        )


class DirectoryLock:
    """An exclusive, advisory lock on a directory while one process writes it.

    ``flock`` on ``DIR/.lock``, which holds the writer's pid (what a refused writer is told).
    Re-entrant within a process (a library user may build several trainers on one run in turn);
    the lock file is removed on :meth:`release`.
    """

    NAME = ".lock"
    _held: dict[Path, tuple[int, int]] = {}  # resolved directory -> (fd, holders), this process

    def __init__(self, directory: Path, *, field: str = "run_dir") -> None:
        self.directory = directory
        self.field = field
        self.path = directory / self.NAME
        self._key = directory.resolve()
        self._holding = False

    def acquire(self) -> DirectoryLock:
        """Take the lock (the directory must exist); ConfigError naming the holder's pid when
        another process holds it."""
        if self._holding:
            return self
        if self._key in self._held:
            fd, n = self._held[self._key]
            self._held[self._key] = (fd, n + 1)
            self._holding = True
            return self
        if fcntl is None:
            return self
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.read(fd, 64).decode(errors="replace").strip() or "unknown"
                os.close(fd)
                raise ConfigError(
                    self.field,
                    f"{str(self.directory)!r} is being written by another process (pid {holder}); "
                    "wait for it to finish, or stop it",
                ) from None
            try:  # the holder may have released and removed the file between open and flock
                same = os.path.samestat(os.fstat(fd), os.stat(self.path))
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._held[self._key] = (fd, 1)
        self._holding = True
        return self

    def release(self) -> None:
        """Give the lock up (the file goes when this process's last holder releases it)."""
        if not self._holding:
            return
        self._holding = False
        held = self._held.get(self._key)
        if held is None:
            return
        fd, n = held
        if n > 1:
            self._held[self._key] = (fd, n - 1)
            return
        del self._held[self._key]
        with contextlib.suppress(OSError):
            self.path.unlink()  # while still locked: no other process can hold this file
        os.close(fd)

    @property
    def holding(self) -> bool:
        return self._holding
