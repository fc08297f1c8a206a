"""Every random stream a run draws from: seeded at the start, saved in checkpoints, restored on
resume.

Why all of them: a resumed run continues the curve of an uninterrupted one only if every number
drawn after the checkpoint is the one the uninterrupted run drew. moelab's own training draws
from torch's generators (router jitter, sampling routers such as SparseMixer); Python's
``random`` and numpy's global generator are saved too, for user components that draw from them
(moelab's data sampler uses its own seeded numpy generator per batch, not the global one).

Under ``torchrun`` every rank has its own streams (expert parallelism draws different amounts
on different ranks), so each rank's state is saved and, when the run resumes on the same number
of ranks, each rank gets its own back; on another number of ranks, every rank gets rank 0's
(the draws cannot continue exactly there anyway: the work is split differently).
"""

from __future__ import annotations

import random
import warnings
from typing import Any

import numpy as np
import torch

__all__ = ["restore_rng", "rng_state", "seed_everything", "set_rng_state"]


def seed_everything(seed: int) -> None:
    """Seed torch (CPU and every CUDA device), Python's ``random`` and numpy's global stream."""
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed % 2**32)


def rng_state() -> dict[str, Any]:
    """This process's random streams, as plain values and tensors (``torch.load`` reads them
    back with ``weights_only=True``)."""
    kind, key, pos, has_gauss, gauss = np.random.get_state(legacy=True)
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": {
            "kind": str(kind),
            "key": torch.from_numpy(np.asarray(key, dtype=np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "gauss": float(gauss),
        },
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Set every stream ``state`` holds (see :func:`rng_state`); streams it lacks (a checkpoint of
    an older moelab had no numpy state) are left as they are."""
    torch.set_rng_state(state["torch"])
    if "python" in state:
        random.setstate(_as_tuple(state["python"]))
    if "numpy" in state:
        n = state["numpy"]
        key = n["key"].numpy().astype(np.uint32)
        np.random.set_state((n["kind"], key, n["pos"], n["has_gauss"], n["gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        cuda = list(state["cuda"])
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)
        else:
            warnings.warn(
                f"the checkpoint holds the RNG state of {len(cuda)} CUDA devices, this process "
                f"sees {torch.cuda.device_count()}: CUDA random streams are not restored",
                stacklevel=2,
            )


def restore_rng(state: dict[str, Any], rank: int, world_size: int, where: str) -> None:
    """Restore this rank's streams from a checkpoint's training ``state`` (see the module
    docstring); a checkpoint without RNG state (an older format) resumes with a warning: its
    random draws restart from the seeded streams, so it does not repeat an uninterrupted run
    that draws random numbers. ``where``: the state file, for the warning."""
    by_rank = state.get("rng_by_rank")
    if by_rank is not None and len(by_rank) == world_size:
        set_rng_state(by_rank[rank])
    elif "rng" in state:
        set_rng_state(state["rng"])
    else:
        warnings.warn(
            f"{where} holds no RNG state (an older checkpoint): the random streams continue "
            "from train.seed, so random draws (router jitter, sampling routers) differ "
            "from an uninterrupted run's",
            stacklevel=2,
        )


def _as_tuple(x: Any) -> Any:
    """``random.setstate`` wants tuples; a state read back from a checkpoint may hold lists."""
    return tuple(_as_tuple(v) for v in x) if isinstance(x, list | tuple) else x
