"""The ``distributed`` section of a run config: how a run launched by ``torchrun`` is parallelised.

A run started without ``torchrun`` (one process) ignores this section. Under ``torchrun`` every
process is a data-parallel rank; ``expert_parallel`` ranks of them also share the experts of each
MoE layer (parallel folding: the expert-parallel group is folded onto the data-parallel ranks).
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Literal, Protocol

from moelab.config import Config, check

if TYPE_CHECKING:
    from moelab.model import ModelConfig

__all__ = ["DistributedConfig", "LaunchConfig"]


@dataclasses.dataclass(kw_only=True)
class DistributedConfig(Config):
    """Parallelism of a ``torchrun`` launch (ignored by a one-process run).

    * ``data_parallel``: ``ddp`` (replicated weights, gradients all-reduced during backward) or
      ``fsdp2`` (``fully_shard``: weights, gradients and optimizer state sharded over the ranks).
    * ``expert_parallel``: ranks that share one copy of the experts (1: every rank holds all
      experts). Must divide the number of processes and every MoE layer's routed experts.
    * ``backend``: ``auto`` (nccl on CUDA, gloo otherwise), ``gloo`` or ``nccl``.
    * ``timeout_s``: how long a collective waits for a rank before failing the run.
    """

    data_parallel: Literal["ddp", "fsdp2"] = "ddp"
    expert_parallel: int = 1
    backend: Literal["auto", "gloo", "nccl"] = "auto"
    timeout_s: float = 600.0

    def validate(self) -> None:
        ep = self.expert_parallel
        check(ep >= 1, "expert_parallel", f"must be a positive integer, got {ep}")
        check(self.timeout_s > 0, "timeout_s", f"must be > 0, got {self.timeout_s}")


class DataSection(Protocol):
    """What a launch reads of the ``data`` section: the global batch and its micro-batches."""

    @property
    def batch_size(self) -> int: ...

    @property
    def micro_batch_size(self) -> int | None: ...


class TrainSection(Protocol):
    """What a launch reads of the ``train`` section: the device (``auto``, ``cpu``, ``cuda``)."""

    @property
    def device(self) -> str: ...


class LaunchConfig(Protocol):
    """What :mod:`moelab.distributed` reads of a run config to check and build a launch.

    :class:`moelab.train.RunConfig` is one; it is named by what it offers because
    ``moelab.distributed`` sits below ``moelab.train`` and does not import it."""

    @property
    def model(self) -> ModelConfig: ...

    @property
    def data(self) -> DataSection: ...

    @property
    def train(self) -> TrainSection: ...

    @property
    def distributed(self) -> DistributedConfig: ...
