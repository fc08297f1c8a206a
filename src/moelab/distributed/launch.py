"""Start-up of a ``torchrun`` launch: who am I, is the layout valid, the process group, the meshes.

Every check here is a pure function of the config, the world size and the machine, run on every
rank *before* the process group exists: a bad setting fails on all ranks at once with the same
one-line :class:`~moelab.config.ConfigError` naming the setting, and no rank is left waiting for
another in a rendezvous or a collective.

The mesh is 2-D, ``(edp, ep)`` = ``(world / ep, ep)``, row-major over the global ranks ("parallel
folding"): attention, embeddings and the dense FFNs are data-parallel over all ``world`` ranks;
the experts of each MoE layer are split over the ``ep`` ranks of a row (contiguous blocks of
``E / ep`` experts), and each expert is replicated over the ``edp = world / ep`` rows.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

from moelab.config import ConfigError
from moelab.distributed.env import LaunchEnv
from moelab.distributed.rendezvous import take_store

if TYPE_CHECKING:
    from torch.distributed.device_mesh import DeviceMesh

    from moelab.distributed.config import LaunchConfig

__all__ = [
    "LaunchEnv",
    "Topology",
    "check_layout",
    "init_topology",
    "resolve_backend",
    "close_process_group",
    "run_guarded",
]


def resolve_backend(requested: str, device_type: str) -> str:
    """``auto`` → ``nccl`` for CUDA training, ``gloo`` otherwise."""
    if requested == "auto":
        return "nccl" if device_type == "cuda" else "gloo"
    return requested


def check_layout(config: LaunchConfig, env: LaunchEnv, cuda_devices: int | None = None) -> None:
    """Refuse a parallel layout the run cannot use; the same error on every rank.

    ``config``: a :class:`~moelab.distributed.config.LaunchConfig` (a
    :class:`moelab.train.RunConfig`; its ``model``, ``data``, ``train`` and ``distributed``
    sections are read). ``cuda_devices``: GPUs visible to this process (default:
    ``torch.cuda.device_count()``).
    """
    d = config.distributed
    world, ep = env.world_size, d.expert_parallel
    gpus = torch.cuda.device_count() if cuda_devices is None else cuda_devices
    device = config.train.device
    if d.backend == "nccl":
        if gpus == 0:
            raise ConfigError(
                "distributed.backend",
                "'nccl' needs CUDA GPUs, and this machine has none; use gloo (or auto)",
            )
        if device == "cpu":
            raise ConfigError(
                "distributed.backend", "'nccl' needs train.device cuda (or auto), got cpu"
            )
    uses_cuda = device == "cuda" or (device == "auto" and gpus > 0)
    if uses_cuda and gpus < env.local_world_size:
        raise ConfigError(
            "train.device",
            f"{env.local_world_size} processes on this node need one GPU each, but {gpus} "
            "GPU(s) are visible; start fewer processes (--nproc_per_node) or train on cpu",
        )
    if world % ep:
        raise ConfigError(
            "distributed.expert_parallel",
            f"must divide the number of processes ({world}), got {ep}",
        )
    ffn = config.model.ffn
    if ep > 1:
        if ffn.kind != "moe":
            raise ConfigError(
                "distributed.expert_parallel",
                f"{ep} needs MoE layers (model.ffn.kind: moe), but model.ffn.kind is {ffn.kind}",
            )
        experts = ffn.num_experts * ffn.granularity
        if experts % ep:
            raise ConfigError(
                "distributed.expert_parallel",
                f"must divide the routed experts of each MoE layer (model.ffn.num_experts x "
                f"granularity = {experts}), got {ep}",
            )
        for name in ("capacity_factor", "eval_capacity_factor"):
            if getattr(ffn, name) is not None:
                raise ConfigError(
                    "distributed.expert_parallel",
                    f"expert parallelism is dropless: set model.ffn.{name} to null",
                )
    if d.data_parallel == "fsdp2" and ffn.kind in ("peer", "pkm"):
        raise ConfigError(
            "distributed.data_parallel",
            f"fsdp2 cannot shard {ffn.kind}'s sparse-gradient tables; use ddp",
        )
    batch, micro = config.data.batch_size, config.data.micro_batch_size
    if batch % world:
        raise ConfigError(
            "data.batch_size",
            f"must be divisible by the number of processes ({world}): each rank trains "
            f"batch_size / {world} sequences of every step; got {batch}",
        )
    local = batch // world
    if micro is not None and local % micro:
        raise ConfigError(
            "data.micro_batch_size",
            f"must divide the batch of each rank (data.batch_size / {world} processes = "
            f"{local}), got {micro}",
        )


@dataclass
class Topology:
    """The process group and the 2-D ``(edp, ep)`` mesh of a launch.

    ``ep_group``: the ranks that share one copy of the experts (a mesh row);
    ``edp_group``: the ranks that hold the same experts (a mesh column; gradients of the experts
    are summed over it). With ``ep == 1`` ``ep_group`` is None and ``edp_group`` is the world.
    """

    env: LaunchEnv
    backend: str
    device: torch.device
    mesh: DeviceMesh
    ep: int
    ep_group: dist.ProcessGroup | None
    edp_group: dist.ProcessGroup | None
    owns_process_group: bool

    @property
    def rank(self) -> int:
        return self.env.rank

    @property
    def world_size(self) -> int:
        return self.env.world_size

    @property
    def ep_rank(self) -> int:
        return self.env.rank % self.ep

    @property
    def edp(self) -> int:
        return self.env.world_size // self.ep

    @property
    def dp_group(self) -> dist.ProcessGroup:
        """Every rank: the data-parallel group of the replicated parameters (and of the
        statistics summed over ranks)."""
        return dist.group.WORLD


def init_topology(config: LaunchConfig, env: LaunchEnv, device: torch.device) -> Topology:
    """Initialise the default process group (unless already done) and build the mesh.

    ``device`` is the training device (``cuda`` becomes ``cuda:LOCAL_RANK``). Call
    :func:`check_layout` first.
    """
    # imported here: DeviceMesh pulls in DTensor (~1 s), which one-process runs never need
    from torch.distributed.device_mesh import init_device_mesh

    d = config.distributed
    backend = resolve_backend(d.backend, device.type)
    if device.type == "cuda":
        device = torch.device("cuda", env.local_rank)
        torch.cuda.set_device(device)
    owns = not dist.is_initialized()
    if owns:
        store = take_store()  # the launch's store, if rank0_choice opened it already
        where: dict[str, Any] = (
            {"init_method": "env://"}
            if store is None
            else {"store": dist.PrefixStore("default_pg", store)}  # what env:// would build
        )
        dist.init_process_group(
            backend=backend,
            rank=env.rank,
            world_size=env.world_size,
            timeout=timedelta(seconds=d.timeout_s),
            **where,
        )
    elif dist.get_world_size() != env.world_size:
        raise ConfigError(
            "",
            f"the initialised process group has {dist.get_world_size()} ranks, "
            f"WORLD_SIZE says {env.world_size}",
        )
    ep = d.expert_parallel
    edp = env.world_size // ep
    mesh = init_device_mesh(device.type, (edp, ep), mesh_dim_names=("edp", "ep"))
    ep_group = edp_group = None
    if ep > 1:
        ep_group = mesh.get_group("ep")
    if edp > 1:
        edp_group = mesh.get_group("edp")
    return Topology(
        env=env,
        backend=backend,
        device=device,
        mesh=mesh,
        ep=ep,
        ep_group=ep_group,
        edp_group=edp_group,
        owns_process_group=owns,
    )


# ---- a failing rank ends the launch --------------------------------------------------------------

QUIET_EXIT_DELAY_S = 5.0
PEER_FAILURE = ("Connection closed by peer", "Connection reset by peer", "Broken pipe", "timed out")


def run_guarded(command: Callable[[], int]) -> int:
    """Run ``command`` (returns an exit code); under a launch, any exception ends this process at
    once with a non-zero code, after printing what happened on this rank.

    Exiting is what aborts the group: the other ranks' pending or next collective fails as soon
    as this process's connections close, and they exit the same way, so no rank waits for one
    that is gone (``torchrun`` also stops the others when one exits non-zero). Errors in the
    settings (:class:`~moelab.config.ConfigError`) are the same on every rank: the first process of
    each node prints the one line; the others exit with the same code without repeating it, a
    moment later (``torchrun`` stops a node's processes as soon as one of them exits).
    """
    env = LaunchEnv.from_env()
    if env is None or env.world_size == 1:
        return command()
    try:
        code = command()
    except SystemExit:
        close_process_group()
        raise
    except BaseException as err:  # noqa: BLE001 - every failure must end the launch
        code = _report(err, env.rank, env.local_rank)
        sys.stdout.flush()
        sys.stderr.flush()
        _abort_process_group()
        os._exit(code)
    close_process_group()
    return code


def close_process_group() -> None:
    """Destroy the process group, if one is left, before this process exits normally.

    Why: a gloo group still alive at interpreter exit is torn down with the interpreter, and its
    communication threads can then end the process with ``std::terminate`` ("terminate called
    without an active exception", SIGABRT) after all its work is done. A failing rank leaves by
    ``os._exit`` instead (see :func:`run_guarded`), which runs no teardown at all."""
    if dist.is_initialized():
        dist.destroy_process_group()


def _report(err: BaseException, rank: int, local_rank: int) -> int:
    """Print the failure as seen on ``rank``; returns the exit code."""
    if isinstance(err, KeyboardInterrupt):
        if rank == 0:
            print("interrupted", file=sys.stderr)
        return 130
    if isinstance(err, ConfigError):
        if local_rank == 0:
            print(f"moelab: error: {err}", file=sys.stderr)
        else:  # let local rank 0 print it before torchrun stops this node's processes
            time.sleep(QUIET_EXIT_DELAY_S)
        return 2
    text = " ".join(str(err).split())
    if isinstance(err, dist.DistBackendError) or any(s in text for s in PEER_FAILURE):
        print(
            f"moelab: error [rank {rank}]: stopped because another rank failed or left "
            f"({type(err).__name__}: {text[:300]})",
            file=sys.stderr,
        )
        return 1
    if isinstance(err, ValueError):
        print(f"moelab: error [rank {rank}]: {err}", file=sys.stderr)
        return 2
    print(f"moelab: error [rank {rank}]: {type(err).__name__}: {text}", file=sys.stderr)
    traceback.print_exception(err, file=sys.stderr)
    return 1


def _abort_process_group() -> None:
    """Abort (NCCL) what may be in flight; gloo's connections close when the process exits."""
    if not dist.is_initialized():
        return
    abort = getattr(dist.distributed_c10d, "_abort_process_group", None)
    if abort is not None and dist.get_backend() == "nccl":
        with contextlib.suppress(Exception):  # best effort on the way out
            abort()
