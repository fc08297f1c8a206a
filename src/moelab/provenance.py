"""Where a number came from: the code, the software, the machine and the data of a run.

Every run directory records :func:`collect` at creation (``provenance.json``), and reports show it
in their header, so a reader can tell whether two results are comparable: bit-for-bit (same
commit, same torch build, same CPU, same thread count) or only within tolerance (anything else).
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import subprocess
from pathlib import Path
from typing import Any

import torch

import moelab

# Fields that must agree for two runs' numbers to be reproducible bit for bit on CPU.
BITWISE_KEYS = ("git_commit", "git_dirty", "torch", "cpu", "threads")


def git_state(root: Path | None = None) -> tuple[str | None, bool | None]:
    """``(commit, dirty)`` of the moelab checkout, or ``(None, None)`` outside a git checkout
    (an installed wheel) or without git."""
    root = root or Path(moelab.__file__).resolve().parent
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True
        ).stdout.strip()
        status = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=root,
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    except (OSError, subprocess.CalledProcessError):
        return None, None
    return commit, bool(status.strip())


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo`` on Linux, ``platform.processor()`` elsewhere)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


# meta.json fields that say where and by which version a dataset was prepared, not what it holds:
# left out of the checksum, so the same data prepared in another checkout or folder has the same
# identity ("source" entries keep what they counted, without their "path").
META_LOCAL_FIELDS = ("tokenizer", "created_with")
CHECKSUM_VERSION = 2  # 1 hashed meta.json verbatim (absolute paths included)


def _meta_identity(raw: bytes) -> bytes:
    """The path-independent part of a ``meta.json`` as canonical JSON (``raw`` itself when it is
    not a JSON object)."""
    try:
        meta = json.loads(raw)
    except ValueError:
        return raw
    if not isinstance(meta, dict):
        return raw
    meta = {k: v for k, v in meta.items() if k not in META_LOCAL_FIELDS}
    if isinstance(meta.get("source"), list):
        meta["source"] = [
            {k: v for k, v in s.items() if k != "path"} if isinstance(s, dict) else s
            for s in meta["source"]
        ]
    return json.dumps(meta, sort_keys=True, separators=(",", ":")).encode()


def hash_file(digest: Any, path: Path) -> None:
    """Feed ``path``'s bytes into ``digest`` (a ``hashlib`` object), 1 MiB at a time."""
    with Path(path).open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)


def file_sha256(path: Path) -> str:
    """sha256 of one file's bytes (what ``sha256sum`` prints)."""
    digest = hashlib.sha256()
    hash_file(digest, path)
    return digest.hexdigest()


def data_checksum(dataset_dir: Path) -> str | None:
    """sha256 over a prepared dataset's files (None if there are none), in name order: the token
    and domain files and the tokenizer byte for byte, ``meta.json`` without the fields that name
    a path (:data:`META_LOCAL_FIELDS`, each source's ``path``). Two runs with equal checksums
    trained on the same tokens, wherever each checkout prepared them. (Reused across runs by
    :func:`moelab.data.dataset_checksum`, which keeps it in the per-user cache.)"""
    files = sorted(p for p in Path(dataset_dir).glob("*") if p.is_file())
    if not files:
        return None
    digest = hashlib.sha256()
    for path in files:
        digest.update(path.name.encode())
        if path.name == "meta.json":
            digest.update(_meta_identity(path.read_bytes()))
            continue
        hash_file(digest, path)
    return digest.hexdigest()


def source_reference(source: str | Path, run_dir: str | Path) -> str:
    """How a run's provenance ``origin`` names a directory ``source`` it was made from: the run
    or checkpoint its weights came from, or a dataset it read (``compress``'s calibration data).
    Relative to the new run's directory ``run_dir`` (``"../topk-seed0"``) when both lie inside
    the working directory (a project or results tree, copied or committed as a whole, as
    ``compare --suite`` records its own paths), else absolute. Read it back with
    :func:`source_path`."""
    src = Path(source).expanduser().resolve()
    out = Path(run_dir).expanduser().resolve()
    here = Path.cwd().resolve()
    if src.is_relative_to(here) and out.is_relative_to(here):
        return Path(os.path.relpath(src, out)).as_posix()
    return str(src)


def source_path(run_dir: str | Path, recorded: str | Path) -> Path:
    """The directory an ``origin``'s ``source`` names (:func:`source_reference`): relative ones
    count from ``run_dir``; provenance written before names absolute paths, returned as they are."""
    path = Path(recorded).expanduser()
    return path if path.is_absolute() else Path(run_dir) / path


def weights_sha256(files: list[Path]) -> str | None:
    """sha256 of a checkpoint's weight files (None if there are none): of the bytes of a single
    file (what ``sha256sum model.safetensors`` prints), over each name and its bytes in name
    order for several (a sharded checkpoint)."""
    files = sorted(f for f in files if f.is_file())
    if not files:
        return None
    if len(files) == 1:
        return file_sha256(files[0])
    digest = hashlib.sha256()
    for path in files:
        digest.update(path.name.encode())
        hash_file(digest, path)
    return digest.hexdigest()


def source_fields(source: str | Path, run_dir: str | Path, weights: list[Path]) -> dict[str, Any]:
    """An ``origin``'s ``source`` (:func:`source_reference`) and ``source_sha256`` (the source
    checkpoint's weight files, :func:`weights_sha256`): what identifies the weights a run started
    from wherever its source is later found. Every command that writes a run from another
    (``compress``, ``prune``, ``upcycle``, ``convert-hf``) records these."""
    return {"source": source_reference(source, run_dir), "source_sha256": weights_sha256(weights)}


def collect(
    device: torch.device | str = "cpu",
    dataset_dir: Path | None = None,
    data_sha256: str | None = None,
) -> dict[str, Any]:
    """The provenance record of a run about to train on ``device`` with ``dataset_dir``
    (``data_sha256``: its checksum when the caller has it, else computed here)."""
    commit, dirty = git_state()
    device = torch.device(device)
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    return {
        "moelab": moelab.__version__,
        "git_commit": commit,
        "git_dirty": dirty,
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu": cpu_model(),
        "gpu": gpu,
        "device": str(device),
        "threads": torch.get_num_threads(),
        "data": None if dataset_dir is None else str(dataset_dir),
        "data_sha256": (
            data_sha256 if data_sha256 or dataset_dir is None else data_checksum(dataset_dir)
        ),
    }


def differences(records: dict[str, dict[str, Any]], keys: tuple[str, ...] = BITWISE_KEYS) -> dict:
    """``{key: {name: value}}`` for each of ``keys`` on which the named records disagree."""
    out: dict[str, dict[str, Any]] = {}
    for key in keys:
        values = {name: rec.get(key) for name, rec in records.items()}
        if len({repr(v) for v in values.values()}) > 1:
            out[key] = values
    return out
