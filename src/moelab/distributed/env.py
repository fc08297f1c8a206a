"""What ``torchrun`` tells each process: its rank, the world size and its place on the node.

Its own module so that both the launch (:mod:`moelab.distributed.launch`) and the rendezvous that
precedes the process group (:mod:`moelab.distributed.rendezvous`) read it without importing each
other.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from moelab.config import ConfigError

__all__ = ["ENV_VARS", "LaunchEnv"]

ENV_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@dataclass(frozen=True)
class LaunchEnv:
    """What ``torchrun`` tells each process (environment variables ``RANK``, ``WORLD_SIZE``,
    ``LOCAL_RANK``, ``LOCAL_WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT``)."""

    rank: int
    world_size: int
    local_rank: int
    local_world_size: int

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None) -> LaunchEnv | None:
        """The launch this process belongs to, or None when it was not started by ``torchrun``
        (no ``WORLD_SIZE``): a one-process run."""
        env = os.environ if environ is None else environ
        if "WORLD_SIZE" not in env:
            return None
        missing = [name for name in ENV_VARS if name not in env]
        if missing:
            raise ConfigError(
                "",
                f"WORLD_SIZE is set but {', '.join(missing)} not: start distributed runs with "
                "torchrun (torchrun --nproc_per_node N -m moelab train ...)",
            )
        world = int(env["WORLD_SIZE"])
        return cls(
            rank=int(env["RANK"]),
            world_size=world,
            local_rank=int(env["LOCAL_RANK"]),
            local_world_size=int(env.get("LOCAL_WORLD_SIZE", world)),
        )
