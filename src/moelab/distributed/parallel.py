"""What the trainer asks of its parallel setting, for one process and for a ``torchrun`` launch.

:class:`SingleProcess` answers for a run in one process and changes nothing: every method returns
its input or does nothing, so one-process numerics stay exactly as they were.
:class:`DataParallel` is a ``torchrun`` launch: data parallelism (DDP or FSDP2) over every rank,
optionally with the experts split over expert-parallel groups folded onto those ranks.

Gradients of a data-parallel step (``W`` ranks, each with its share of the global batch and its
own loss ``L_r``, the mean over its tokens) are ``1/W · Σ_r ∇L_r``, the gradient of the global
batch's mean loss:

* replicated parameters: DDP's all-reduce (average) during the backward of the last micro-batch,
  or FSDP2's reduce-scatter;
* expert weights under expert parallelism: the all-to-all's backward already sums every rank of
  the expert-parallel group into the rank that owns the expert; :meth:`finish_gradients` sums the
  ``W / ep`` copies of each expert and divides by ``W`` (under FSDP2, which shards each expert
  block over its copies, its reduce-scatter does this);
* sparse row gradients (PEER / PKM tables), which DDP cannot reduce: all-gathered rows, summed,
  divided by ``W`` (:func:`~moelab.distributed.wrapping.sync_sparse_grad`), so the update stays
  sparse.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Callable, Iterable
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from moelab.distributed.config import LaunchConfig
from moelab.distributed.expert_parallel import CommClock, ShardedParam, apply_expert_parallel
from moelab.distributed.launch import LaunchEnv, Topology, check_layout, init_topology
from moelab.distributed.rank_sum import GroupSum, hand_rank_sum
from moelab.distributed.wrapping import (
    apply_fsdp2,
    expert_mesh,
    fsdp_no_sync,
    probe_gradients,
    split_grad_norm_,
    sync_sparse_grad,
)
from moelab.layers.base import RoutingStats
from moelab.layers.ranks import RankSum

if TYPE_CHECKING:
    from torch.distributed.device_mesh import DeviceMesh

__all__ = ["DataParallel", "SingleProcess", "setup"]


class SingleProcess:
    """A run in one process: no communication, nothing changes."""

    rank = 0
    world_size = 1
    is_main = True
    distributed = False
    sharded: dict[str, ShardedParam] = {}  # noqa: RUF012 - read-only here
    rank_sum: RankSum | None = None  # the sum over data-parallel ranks (none in one process)

    def describe(self) -> str:
        return "1 process"

    def layout(self) -> dict[str, Any]:
        return {"world_size": 1}

    def place(self, device: torch.device) -> torch.device:
        """The device this rank trains on."""
        return device

    def sampler_shard(self) -> tuple[int, int] | None:
        """``(index, count)`` of this rank's part of every global batch (None: all of it)."""
        return None

    def micro_batches(self, batch_size: int, micro_batch_size: int | None) -> int:
        """Forward/backward passes per step on this rank."""
        return batch_size // (micro_batch_size or batch_size)

    def parallelize(self, model: nn.Module) -> nn.Module:
        """Apply the parallelism to ``model`` (in place); returns what the training forward
        calls. Its modules that sum statistics over ranks get :attr:`rank_sum`."""
        return model

    def connect(self, *parts: object) -> None:
        """Hand :attr:`rank_sum` to ``parts`` that sum statistics over ranks (the trainer's
        between-step hooks: ReMoE's λ controller, the router load hook; models are searched
        module by module). Nothing to sum in one process."""

    def sync_gradients(self, last: bool) -> contextlib.AbstractContextManager:
        """Around each micro-batch's forward and backward: gradients are reduced across ranks
        only in the last one."""
        return contextlib.nullcontext()

    def finish_gradients(self, model: nn.Module) -> None:
        """After the last micro-batch: the gradient synchronisation DDP / FSDP2 do not do."""

    def clip_grad_norm_(
        self,
        model: nn.Module,
        max_norm: float,
        local_clip: Callable[[Iterable[Tensor], float], Tensor],
    ) -> float:
        """Clip the global gradient norm to ``max_norm``; returns the norm before clipping."""
        return float(local_clip(model.parameters(), max_norm))

    def reduce_step(
        self,
        lm: float,
        aux: dict[str, float],
        stats: dict[str, RoutingStats | None],
    ) -> tuple[float, dict[str, float], dict[str, RoutingStats | None]]:
        """The step's LM loss, aux losses (means) and routing statistics (sums) over all ranks,
        for the metrics line."""
        return lm, aux, stats

    def step_report(self) -> dict[str, Any]:
        """Fields the parallelism adds to a step's metrics line (none in one process)."""
        return {}

    def any(self, flag: bool) -> bool:
        """True on every rank if ``flag`` is True on any (e.g. Ctrl-C seen by one rank)."""
        return flag

    def all_sum(self, t: Tensor) -> Tensor:
        """``t`` summed over every rank (a CPU tensor in, a CPU tensor out)."""
        return t

    def gather_objects(self, obj: Any) -> list[Any]:
        """Every rank's ``obj`` (picklable), by rank, on every rank (here: ``[obj]``)."""
        return [obj]

    def barrier(self) -> None:
        """Wait for every rank."""

    def sync_buffers(self, model: nn.Module) -> None:
        """Make every rank's buffers rank 0's (before evaluating or saving)."""

    def close(self) -> None:
        """Tear down what :func:`~moelab.distributed.setup` started."""


class DataParallel(SingleProcess):
    """A ``torchrun`` launch: DDP or FSDP2 over every rank, experts optionally split over
    expert-parallel groups (see the module docstring)."""

    distributed = True

    def __init__(self, topology: Topology, data_parallel: str) -> None:
        self.topo = topology
        self.data_parallel = data_parallel
        self.rank = topology.rank
        self.world_size = topology.world_size
        self.is_main = topology.rank == 0
        self.sharded = {}
        self._ddp: DistributedDataParallel | None = None
        self._fsdp: nn.Module | None = None
        self.experts_fsdp = False  # expert blocks sharded over their edp copies by FSDP2
        self.expert_mesh: DeviceMesh | None = None  # then: the (ep, edp) mesh of their rows
        self._expert_params: list[nn.Parameter] = []
        self._sparse_params: list[nn.Parameter] = []
        self._comm_device = topology.device if topology.backend == "nccl" else torch.device("cpu")
        self.clock = CommClock()  # time in the expert-parallel all-to-alls
        self.rank_sum = GroupSum(topology.dp_group, self._comm_device)

    def describe(self) -> str:
        t = self.topo
        text = f"{t.world_size} processes ({self.data_parallel}, {t.backend})"
        if t.ep > 1:
            text += f", experts split over {t.ep} ranks x {t.edp} copies"
        return text

    def layout(self) -> dict[str, Any]:
        t = self.topo
        return {
            "world_size": t.world_size,
            "data_parallel": self.data_parallel,
            "expert_parallel": t.ep,
            "backend": t.backend,
        }

    def place(self, device: torch.device) -> torch.device:
        return self.topo.device

    def sampler_shard(self) -> tuple[int, int] | None:
        return (self.rank, self.world_size)

    def micro_batches(self, batch_size: int, micro_batch_size: int | None) -> int:
        local = batch_size // self.world_size
        return local // (micro_batch_size or local)

    # ---- applying the parallelism ---------------------------------------------------------------

    def parallelize(self, model: nn.Module) -> nn.Module:
        t = self.topo
        self.connect(model)  # first: the probe backward below may already sum over ranks
        if t.ep > 1:
            self.sharded = apply_expert_parallel(model, t.ep_group, t.ep, t.ep_rank, self.clock)
        names = dict(model.named_parameters())
        self._expert_params = [names[n] for n in self.sharded]
        if self.data_parallel == "fsdp2":
            self.experts_fsdp = apply_fsdp2(model, t, set(self._expert_params))
            self._fsdp = model
            if self.experts_fsdp:  # checkpoints address the expert rows as (ep, edp) shards
                self.expert_mesh = expert_mesh(t)
            return model
        sparse, unused = probe_gradients(model)
        self._sparse_params = [names[n] for n in sparse]
        DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(
            model, [*self.sharded, *sparse]
        )
        kwargs: dict[str, Any] = {"find_unused_parameters": bool(unused)}
        params = inspect.signature(DistributedDataParallel).parameters
        if "forward_sync_buffers" in params:  # torch >= 2.13 (broadcast_buffers is deprecated)
            kwargs["forward_sync_buffers"] = False
        else:
            kwargs["broadcast_buffers"] = False
        if t.device.type == "cuda":
            kwargs["device_ids"] = [t.device.index]
        self._ddp = DistributedDataParallel(model, **kwargs)
        self.clock.take()  # the probe's all-to-alls are not a step's
        return self._ddp

    def connect(self, *parts: object) -> None:
        hand_rank_sum(parts, self.rank_sum)

    def sync_gradients(self, last: bool) -> contextlib.AbstractContextManager:
        if last:
            return contextlib.nullcontext()
        if self._ddp is not None:
            return self._ddp.no_sync()
        if self._fsdp is not None:
            return fsdp_no_sync(self._fsdp)
        return contextlib.nullcontext()

    def finish_gradients(self, model: nn.Module) -> None:
        t = self.topo
        if self._expert_params and not self.experts_fsdp:  # (else FSDP2 reduce-scattered them)
            grads = [
                p.grad if p.grad is not None else torch.zeros_like(p) for p in self._expert_params
            ]
            if t.edp > 1:  # the other copies of these experts saw other ranks' tokens
                flat = torch.cat([g.reshape(-1) for g in grads])
                dist.all_reduce(flat, group=t.edp_group)
                grads = list(flat.split([g.numel() for g in grads]))
            for p, g in zip(self._expert_params, grads, strict=True):
                p.grad = g.view_as(p).div_(t.world_size)
        for p in self._sparse_params:
            p.grad = sync_sparse_grad(p, self.world_size)

    def clip_grad_norm_(
        self,
        model: nn.Module,
        max_norm: float,
        local_clip: Callable[[Iterable[Tensor], float], Tensor],
    ) -> float:
        """The one-process norm, computed the same way (see
        :func:`~moelab.distributed.wrapping.split_grad_norm_`)."""
        if self._fsdp is None and not self._expert_params:  # the same gradients on every rank
            return float(local_clip(model.parameters(), max_norm))
        whole_experts = [] if self.experts_fsdp else self._expert_params  # (else FSDP2 shards)
        return split_grad_norm_(
            list(model.parameters()),
            max_norm,
            experts={id(p) for p in whole_experts},
            ep_group=self.topo.ep_group,
            fsdp=self._fsdp is not None,
            comm_device=self._comm_device,
        )

    # ---- what the logs show ---------------------------------------------------------------------

    def reduce_step(
        self,
        lm: float,
        aux: dict[str, float],
        stats: dict[str, RoutingStats | None],
    ) -> tuple[float, dict[str, float], dict[str, RoutingStats | None]]:
        names = sorted(aux)
        means = torch.tensor([lm, *(aux[n] for n in names)], dtype=torch.float64)
        means = self._all_reduce(means) / self.world_size
        lm, *values = means.tolist()
        return lm, dict(zip(names, values, strict=True)), self._reduce_stats(stats)

    def _reduce_stats(
        self, stats: dict[str, RoutingStats | None]
    ) -> dict[str, RoutingStats | None]:
        keys = sorted(k for k, st in stats.items() if st is not None)
        if not keys:
            return stats
        parts: dict[str, list[tuple[str, Tensor]]] = {"sum": [], "min": [], "max": []}
        for k in keys:
            st = stats[k]
            for name in RoutingStats.SUMMED:
                if getattr(st, name) is not None:
                    parts["sum"].append((f"{k}.{name}", getattr(st, name)))
            for name, value in sorted(st.extra.items()):
                parts["sum"].append((f"{k}.extra.{name}", value))
            if st.active_min is not None:
                parts["min"].append((f"{k}.active_min", st.active_min))
                parts["max"].append((f"{k}.active_max", st.active_max))
            if st.distinct_experts is not None:
                parts["max"].append((f"{k}.distinct_experts", st.distinct_experts))
        reduced: dict[str, Tensor] = {}
        ops = {"sum": dist.ReduceOp.SUM, "min": dist.ReduceOp.MIN, "max": dist.ReduceOp.MAX}
        for kind, items in parts.items():
            if not items:
                continue
            flat = torch.cat([v.detach().double().reshape(-1).cpu() for _, v in items])
            flat = self._all_reduce(flat, ops[kind])
            for (name, v), r in zip(items, flat.split([v.numel() for _, v in items]), strict=True):
                reduced[name] = r.reshape(v.shape).to(v.dtype)
        out = dict(stats)
        for k in keys:
            st = stats[k]
            fields = {
                f.split(".", 1)[1]: v
                for f, v in reduced.items()
                if f.startswith(f"{k}.") and ".extra." not in f
            }
            extra = {n: reduced[f"{k}.extra.{n}"] for n in st.extra}
            out[k] = replace(st, **fields, extra=extra)
        return out

    def _all_reduce(self, t: Tensor, op: Any = None) -> Tensor:
        t = t.to(self._comm_device)
        dist.all_reduce(t, op=dist.ReduceOp.SUM if op is None else op)
        return t.cpu()

    def step_report(self) -> dict[str, Any]:
        """Expert parallelism: ``all_to_all_s``, this rank's seconds in the all-to-alls of the
        step (forward and backward, waiting for the other ranks included)."""
        if not self.sharded:
            return {}
        return {"all_to_all_s": self.clock.take()}

    def any(self, flag: bool) -> bool:
        return bool(self._all_reduce(torch.tensor([float(flag)]), dist.ReduceOp.MAX)[0] > 0)

    def all_sum(self, t: Tensor) -> Tensor:
        return self._all_reduce(t.clone())

    def gather_objects(self, obj: Any) -> list[Any]:
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def barrier(self) -> None:
        if self._comm_device.type == "cuda":
            dist.barrier(device_ids=[self._comm_device.index])
        else:
            dist.barrier()

    def sync_buffers(self, model: nn.Module) -> None:
        if self._fsdp is not None:
            return
        for buf in model.buffers():
            b = buf.to(self._comm_device)
            dist.broadcast(b, src=0)
            buf.copy_(b)

    def close(self) -> None:
        if self.topo.owns_process_group and dist.is_initialized():
            dist.destroy_process_group()


def setup(config: LaunchConfig, device: torch.device) -> SingleProcess:
    """The parallel setting of this process: :class:`SingleProcess` unless started by
    ``torchrun``; then the layout is checked (the same error on every rank, before any rank waits
    for another), the process group is initialised and :class:`DataParallel` returned.
    ``device``: the training device ``train.device`` resolves to."""
    env = LaunchEnv.from_env()
    if env is None:
        return SingleProcess()
    check_layout(config, env)
    return DataParallel(init_topology(config, env, device), config.distributed.data_parallel)
