"""How checkpoint files are written and read: atomic renames, fsync, clear errors.

Why atomic: a run killed at any instant (Ctrl-C, OOM, pre-emption) must leave either the previous
checkpoint or the new one, never half of one. Files are written into a temporary directory,
flushed, then renamed into place with :func:`os.replace`; a pointer file is replaced the same way.
A file that *is* in place but unreadable (truncated, corrupt) raises :class:`CheckpointError`
naming it: it is never silently skipped, since a silent fallback to an older checkpoint would
quietly repeat or lose training.

This module knows mechanics only; which files a run directory holds and what they are called is
:class:`moelab.rundir.RunDir`'s business, so every function here takes explicit paths.
"""

from __future__ import annotations

import os
import shutil
import warnings
from collections.abc import Collection
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_model, save_model
from torch import nn

__all__ = [
    "listing",
    "CheckpointError",
    "commit_directory",
    "load_state",
    "load_weights",
    "load_sharded",
    "replace_text",
    "save_sharded",
    "save_state",
    "save_weights",
    "sharded_metadata",
]


class CheckpointError(ValueError):
    """A checkpoint that is missing, truncated or corrupt (the message names the file)."""


def listing(path: Path, names: Collection[str], limit: int = 5) -> str:
    """What a directory holds, for a one-line refusal: ``notes/, todo.txt`` (directories with a
    slash), at most ``limit`` names then ``...``."""
    shown = [n + ("/" if (path / n).is_dir() else "") for n in sorted(names)[:limit]]
    return ", ".join(shown) + (", ..." if len(names) > limit else "")


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def save_weights(model: nn.Module, path: Path, step: int) -> None:
    """Weights as safetensors (shared tensors such as a tied head are stored once)."""
    save_model(model, str(path), metadata={"step": str(step)})


def save_state(state: dict[str, Any], path: Path) -> None:
    """Training state (optimizer, scheduler, RNG...) as a ``torch.save`` file."""
    torch.save(state, path)


def commit_directory(tmp: Path, final: Path) -> None:
    """Flush every file of ``tmp`` (and of its sub-directories), then rename it to ``final``
    (replacing an older ``final``)."""
    for f in sorted(tmp.rglob("*")):
        if f.is_file():
            _fsync_file(f)
    if final.exists():  # the same step saved again (e.g. Ctrl-C right after a periodic save)
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync_dir(final.parent)


def replace_text(path: Path, text: str, tmp: Path) -> None:
    """Write ``text`` to ``tmp``, flush it, and rename it over ``path``."""
    tmp.write_text(text)
    _fsync_file(tmp)
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def load_weights(model: nn.Module, path: Path) -> None:
    """Load a safetensors file into ``model`` (strict); CheckpointError when unreadable."""
    if not path.is_file():
        raise CheckpointError(f"{path}: missing weights file")
    try:
        missing, unexpected = load_model(model, str(path), strict=False)
    except (SafetensorError, OSError, RuntimeError, ValueError) as err:
        raise CheckpointError(f"{path}: corrupt or truncated checkpoint file ({err})") from None
    if missing or unexpected:
        raise CheckpointError(
            f"{path}: weights do not match the model (missing {sorted(missing)[:5]}, "
            f"unexpected {sorted(unexpected)[:5]})"
        )


def load_state(path: Path) -> dict[str, Any]:
    """Read a training-state file; CheckpointError when missing or unreadable."""
    if not path.is_file():
        raise CheckpointError(f"{path}: missing training-state file")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # EOFError, UnpicklingError, RuntimeError (zip) ...
        raise CheckpointError(f"{path}: corrupt or truncated checkpoint file ({err})") from None


# ---- sharded checkpoints (torch.distributed.checkpoint) -----------------------------------------


def save_sharded(tensors: dict[str, Any], path: Path) -> None:
    """Write ``tensors`` (plain tensors: the same on every rank, written once; DTensors: each rank
    writes its shard) with ``torch.distributed.checkpoint``: a collective, every rank calls it."""
    import torch.distributed.checkpoint as dcp  # ~1 s to import: only runs that need it pay

    dcp.save(tensors, checkpoint_id=str(path))


def sharded_metadata(path: Path) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """``name → (global shape, dtype)`` of every tensor in a sharded checkpoint directory."""
    if not (path / ".metadata").is_file():
        raise CheckpointError(f"{path}: missing .metadata (an incomplete sharded checkpoint)")
    import torch.distributed.checkpoint as dcp

    try:
        meta = dcp.FileSystemReader(str(path)).read_metadata()
    except Exception as err:  # unpickling errors, truncated files ...
        raise CheckpointError(f"{path}/.metadata: corrupt or truncated ({err})") from None
    return {
        name: (tuple(m.size), m.properties.dtype)
        for name, m in meta.state_dict_metadata.items()
        if hasattr(m, "size")
    }


def load_sharded(tensors: dict[str, Any], path: Path, *, no_dist: bool) -> None:
    """Read a sharded checkpoint into ``tensors`` in place (each plain tensor gets the whole saved
    tensor, each DTensor its shard, whatever the layout it was saved with). ``no_dist``: read in
    this process alone (no process group); otherwise a collective."""
    import torch.distributed.checkpoint as dcp

    try:
        with warnings.catch_warnings():  # "torch.distributed is disabled ...": we know
            warnings.simplefilter("ignore", UserWarning)
            dcp.load(tensors, checkpoint_id=str(path), no_dist=no_dist)
    except (RuntimeError, ValueError, OSError, KeyError) as err:
        text = " ".join(str(err).split())
        raise CheckpointError(f"{path}: cannot read sharded checkpoint ({text[:400]})") from None
