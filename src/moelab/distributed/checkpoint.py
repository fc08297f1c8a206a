"""Checkpoints of a run on several processes, with ``torch.distributed.checkpoint`` (DCP).

A checkpoint directory (names: :class:`~moelab.rundir.RunDir`) holds ``sharded/`` — the weights
(``model.<name>``) and the optimizer state (``optim.<parameter name>.<state name>``) — and
``state.pt``, written by rank 0: step, elapsed time, scheduler, λ controller, sampler position,
RNG, the optimizer's hyper-parameters and the layout the run was saved with.

Every tensor is saved with its *global* shape: replicated tensors once, expert weights (and their
Adam moments) under expert parallelism as ``DTensor`` shards of the full ``[E, ...]`` tensor
(placements ``Replicate()`` over the ``edp`` mesh dimension, ``Shard(0)`` over ``ep``; when FSDP2
also shards each block over its ``edp`` copies, ``(Shard(0), Shard(0))`` over the ``(ep, edp)``
mesh), FSDP2's ``DTensor`` parameters as they are. Loading asks DCP for this rank's part in the
current layout, so a run saved on N ranks resumes on M ranks (another expert-parallel size,
DDP ↔ FSDP2, or one process) whenever the config validates for M (``data.batch_size`` divisible
by M, ...): the same global batches in the same order, the same weights.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from moelab.checkpoint_io import CheckpointError, load_sharded, load_state, save_sharded
from moelab.config import ConfigError
from moelab.distributed.expert_parallel import ShardedParam
from moelab.distributed.parallel import SingleProcess
from moelab.rundir import RunDir

__all__ = ["load_checkpoint", "save_checkpoint"]


def _wrap(t: Tensor, spec: ShardedParam | None, parallel: SingleProcess) -> Tensor:
    """A live local tensor as what DCP should see: the shard of its global tensor, or itself."""
    if spec is None or not parallel.distributed:
        return t
    from torch.distributed.tensor import DTensor, Replicate, Shard  # heavy: only when sharded

    shape = torch.Size(spec.global_shape)
    stride = torch.empty(shape, device="meta").stride()
    if isinstance(t, DTensor):  # FSDP2 also split the block over its edp copies: (ep, edp) rows
        mesh, placements, t = parallel.expert_mesh, [Shard(0), Shard(0)], t.to_local()
    else:  # the whole block, the same on every edp copy
        mesh, placements = parallel.topo.mesh, [Replicate(), Shard(0)]
    return DTensor.from_local(t, mesh, placements, run_check=False, shape=shape, stride=stride)


def _tensors(
    model: nn.Module, optimizer: torch.optim.Optimizer, parallel: SingleProcess
) -> dict[str, Tensor]:
    """Weights and optimizer state, by name, as views of the live tensors."""
    sharded = parallel.sharded
    out = {
        RunDir.SHARDED_MODEL + name: _wrap(t, sharded.get(name), parallel)
        for name, t in model.state_dict().items()
    }
    for name, p in model.named_parameters():
        for key, value in optimizer.state.get(p, {}).items():
            if isinstance(value, Tensor):
                spec = sharded.get(name) if value.shape == p.shape else None
                out[f"{RunDir.SHARDED_OPTIMIZER}{name}.{key}"] = _wrap(value, spec, parallel)
    return out


def _hyper_parameters(optimizer: torch.optim.Optimizer) -> list[dict[str, Any]]:
    return [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]


def save_checkpoint(
    run: RunDir,
    step: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    state: dict[str, Any],
    keep_last: int,
    parallel: SingleProcess,
) -> Path:
    """Every rank: write the checkpoint of ``step`` (``state``: the trainer's non-tensor state,
    without the optimizer); rank 0 lays out and commits it. Returns the checkpoint directory."""
    parallel.barrier()  # nobody still reads the previous checkpoint
    if parallel.is_main:
        run.begin_sharded_checkpoint(step)
    parallel.barrier()
    save_sharded(_tensors(model, optimizer, parallel), run.sharded_tmp(step) / RunDir.SHARDED)
    if parallel.is_main:
        full = dict(state)
        full["optimizer_groups"] = _hyper_parameters(optimizer)
        full["layout"] = parallel.layout()
        run.commit_sharded_checkpoint(step, full, keep_last)
    parallel.barrier()  # the checkpoint is in place before anyone goes on (or exits)
    return run.find_checkpoint(step)


def load_checkpoint(
    run: RunDir,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    parallel: SingleProcess,
    checkpoint: Path | None = None,
) -> tuple[Path, dict[str, Any]]:
    """Every rank: load the latest checkpoint (or ``checkpoint``) into the parallelised ``model``
    and ``optimizer``; returns ``(checkpoint dir, training state)``.

    A sharded checkpoint loads into any layout (see the module docstring). A one-process
    checkpoint (``model.safetensors``) loads on ranks that hold whole replicated weights (DDP
    without expert parallelism); otherwise it fails with a message that says what to do.
    """
    ckpt = checkpoint or run.latest_checkpoint()
    if not run.is_sharded(ckpt):
        return ckpt, _load_single_process(run, ckpt, model, optimizer, parallel)
    run.check_sharded_shapes(model, ckpt, parallel.sharded)
    state = load_state(ckpt / RunDir.STATE)
    saved = run.sharded_shapes(ckpt)
    tensors = _tensors(model, optimizer, parallel)
    names = dict(model.named_parameters())
    new_state: dict[nn.Parameter, dict[str, Tensor]] = {}
    prefix = RunDir.SHARDED_OPTIMIZER
    for key, shape in saved.items():
        if not key.startswith(prefix):
            continue
        name, _, state_key = key[len(prefix) :].rpartition(".")
        p = names.get(name)
        if p is None:
            raise CheckpointError(f"{ckpt}: optimizer state for {name!r}, not in the model")
        if key not in tensors:  # allocate, then DCP fills it
            full = parallel.sharded.get(name)
            full_shape = tuple(full.global_shape) if full else tuple(p.shape)
            if shape == full_shape:
                t = torch.zeros_like(p, memory_format=torch.contiguous_format)
                spec = full
            else:  # scalars (Adam's step), per-row counts of sparse tables
                dtype = torch.int32 if state_key == "row_step" else torch.float32
                device = p.device if state_key == "row_step" else torch.device("cpu")
                t, spec = torch.zeros(shape, dtype=dtype, device=device), None
            new_state.setdefault(p, {})[state_key] = t
            tensors[key] = _wrap(t, spec, parallel)
    load_sharded(tensors, ckpt / RunDir.SHARDED, no_dist=not parallel.distributed)
    for p, values in new_state.items():
        optimizer.state[p].update(values)
    for group, saved_group in zip(
        optimizer.param_groups, state.get("optimizer_groups", []), strict=False
    ):
        group.update(saved_group)
    return ckpt, state


def _load_single_process(
    run: RunDir,
    ckpt: Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    parallel: SingleProcess,
) -> dict[str, Any]:
    layout = parallel.layout()
    if parallel.sharded or layout.get("data_parallel") == "fsdp2":
        raise ConfigError(
            "resume",
            f"{ckpt} was written by one process (whole weights, {RunDir.WEIGHTS}); resume it "
            "with distributed.data_parallel=ddp and distributed.expert_parallel=1 (its next "
            "checkpoint is sharded and resumes with any layout), or in one process",
        )
    ckpt, state = run.load_checkpoint(model, ckpt)
    optimizer.load_state_dict(state.pop("optimizer"))
    return state
