"""Atomic checkpoints: ``checkpoints/step_XXXXXXXX/{model.safetensors,state.pt}`` + ``latest``.

Why atomic: a run killed at any instant (Ctrl-C, OOM, pre-emption) must leave either the previous
checkpoint or the new one, never half of one. A checkpoint is written into a hidden temporary
directory, flushed, then renamed into place with :func:`os.replace`; ``checkpoints/latest`` (a text
file naming the newest checkpoint) is replaced the same way. Leftover temporary directories are
ignored and removed. A checkpoint that *is* in place but unreadable (truncated, corrupt) raises
:class:`CheckpointError` naming the file: it is never silently skipped, since a silent fallback to
an older checkpoint would quietly repeat or lose training.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_model, save_model
from torch import nn

__all__ = [
    "CheckpointError",
    "find_checkpoint",
    "list_checkpoints",
    "load_checkpoint",
    "load_weights",
    "save_checkpoint",
]

WEIGHTS = "model.safetensors"
STATE = "state.pt"
LATEST = "latest"
_TMP_PREFIX = ".tmp-"


class CheckpointError(ValueError):
    """A checkpoint that is missing, truncated or corrupt (the message names the file)."""


def _ckpt_root(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def step_name(step: int) -> str:
    return f"step_{step:08d}"


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


def clean_temporary(run_dir: str | Path) -> list[Path]:
    """Remove half-written checkpoint directories left by a killed run; returns what was removed."""
    root = _ckpt_root(run_dir)
    removed = []
    if root.is_dir():
        for p in root.iterdir():
            if p.name.startswith(_TMP_PREFIX):
                shutil.rmtree(p, ignore_errors=True)
                removed.append(p)
    return removed


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete checkpoint directories (``step_*``), oldest first; temporary ones are ignored."""
    root = _ckpt_root(run_dir)
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("step_"))


def save_checkpoint(
    run_dir: str | Path, step: int, model: nn.Module, state: dict[str, Any], keep_last: int = 2
) -> Path:
    """Write the checkpoint of ``step`` atomically, point ``latest`` at it, keep the last K.

    ``state`` (optimizer, scheduler, controller, RNG, sampler, step...) goes to ``state.pt``; the
    weights go to ``model.safetensors`` (shared tensors such as a tied head are stored once).
    """
    root = _ckpt_root(run_dir)
    root.mkdir(parents=True, exist_ok=True)
    clean_temporary(run_dir)
    name = step_name(step)
    final = root / name
    tmp = root / f"{_TMP_PREFIX}{name}-{os.getpid()}"
    tmp.mkdir()
    save_model(model, str(tmp / WEIGHTS), metadata={"step": str(step)})
    torch.save(state, tmp / STATE)
    for f in (WEIGHTS, STATE):
        _fsync_file(tmp / f)
    if final.exists():  # the same step saved again (e.g. Ctrl-C right after a periodic save)
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync_dir(root)
    latest_tmp = root / f"{_TMP_PREFIX}{LATEST}-{os.getpid()}"
    latest_tmp.write_text(name + "\n")
    _fsync_file(latest_tmp)
    os.replace(latest_tmp, root / LATEST)
    _fsync_dir(root)
    for old in list_checkpoints(run_dir)[:-keep_last]:
        if old.name != name:
            shutil.rmtree(old, ignore_errors=True)
    return final


def find_checkpoint(run_dir: str | Path, checkpoint: str | int | Path | None = None) -> Path:
    """Resolve a checkpoint directory: ``None`` = the one ``latest`` names (or the newest complete
    one when ``latest`` is missing), a step number, a ``step_*`` name, or a path."""
    run_dir = Path(run_dir)
    root = _ckpt_root(run_dir)
    if checkpoint is None:
        latest = root / LATEST
        if latest.is_file():
            name = latest.read_text().strip()
            path = root / name
            if not name.startswith("step_") or not path.is_dir():
                raise CheckpointError(
                    f"{latest}: names checkpoint {name!r}, which does not exist in {root}"
                )
            return path
        ckpts = list_checkpoints(run_dir)
        if not ckpts:
            raise CheckpointError(f"{run_dir}: no checkpoint found (expected {root}/step_*/)")
        return ckpts[-1]
    if isinstance(checkpoint, int) or (isinstance(checkpoint, str) and checkpoint.isdigit()):
        path = root / step_name(int(checkpoint))
    else:
        path = Path(checkpoint)
        if not path.is_absolute() and not path.exists():
            path = root / str(checkpoint)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint {checkpoint!r} not found (looked for {path})")
    return path


def load_weights(model: nn.Module, ckpt_dir: str | Path) -> None:
    """Load ``model.safetensors`` into ``model`` (strict); CheckpointError when unreadable."""
    path = Path(ckpt_dir) / WEIGHTS
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


def load_state(ckpt_dir: str | Path) -> dict[str, Any]:
    """Read ``state.pt``; CheckpointError when missing or unreadable."""
    path = Path(ckpt_dir) / STATE
    if not path.is_file():
        raise CheckpointError(f"{path}: missing training-state file")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # EOFError, UnpicklingError, RuntimeError (zip) ...
        raise CheckpointError(f"{path}: corrupt or truncated checkpoint file ({err})") from None


def load_checkpoint(
    run_dir: str | Path, model: nn.Module, checkpoint: str | int | Path | None = None
) -> tuple[Path, dict[str, Any]]:
    """Load weights into ``model`` and return ``(checkpoint dir, training state)``."""
    ckpt = find_checkpoint(run_dir, checkpoint)
    load_weights(model, ckpt)
    return ckpt, load_state(ckpt)
