"""The key-value store of a ``torchrun`` launch, before the process group exists: what every rank
must agree on before the trainer starts (the default run directory, named from rank 0's clock).

``torchrun`` gives each process ``MASTER_ADDR`` / ``MASTER_PORT``; the default process group
rendezvous there through a ``TCPStore`` (hosted by rank 0, or by ``torchrun``'s agent). The store
opened here is that same one, opened once per process: :func:`init_topology
<moelab.distributed.launch.init_topology>` builds the process group on it (with the ``default_pg``
prefix that ``init_method="env://"`` uses), so nothing else listens on the port.
"""

from __future__ import annotations

import itertools
import os
from datetime import timedelta

import torch.distributed as dist

from moelab.distributed.env import LaunchEnv

__all__ = ["rank0_choice", "take_store"]

_opened: dict[str, dist.Store] = {}  # this process's store, until the process group takes it
_calls = itertools.count()  # rank0_choice calls of this process (every rank makes the same ones)


def _store(env: LaunchEnv, timeout_s: float) -> dist.Store:
    if dist.is_initialized():  # e.g. a library user's own group: its store
        return dist.distributed_c10d._get_default_store()
    if "env" not in _opened:
        timeout = timedelta(seconds=timeout_s)
        store, _, _ = next(
            dist.rendezvous("env://", rank=env.rank, world_size=env.world_size, timeout=timeout)
        )
        store.set_timeout(timeout)
        _opened["env"] = store
    return _opened["env"]


def take_store() -> dist.Store | None:
    """The store :func:`rank0_choice` opened, for the default process group (None if none was
    opened: the group then makes its own from ``env://``)."""
    return _opened.pop("env", None)


def rank0_choice(value: str, timeout_s: float = 600.0) -> str:
    """Rank 0's ``value``, on every rank of a launch (``value`` itself outside one).

    For what each rank would otherwise compute on its own and could get differently (a name taken
    from the clock: ranks start seconds apart on a busy machine). Every rank of the launch must
    call it, in the same order; each returns once every rank has read rank 0's value, so rank 0
    cannot leave (or close its store) while another rank still waits for it. ``timeout_s``: how
    long a rank waits for the others."""
    env = LaunchEnv.from_env()
    if env is None or env.world_size == 1:
        return value
    restart = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")  # torchrun's store outlives us
    key = f"moelab/rank0_choice/{restart}/{next(_calls)}"
    store = _store(env, timeout_s)
    if env.rank == 0:
        store.set(key, value)
    chosen = store.get(key).decode()
    store.set(f"{key}/read/{env.rank}", "1")
    if env.rank == 0:
        store.wait([f"{key}/read/{r}" for r in range(1, env.world_size)])
    return chosen
