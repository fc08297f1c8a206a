"""How a data-parallel model is wrapped and its gradients made whole, apart from the trainer's
view of parallelism (:mod:`moelab.distributed.parallel`): FSDP2 sharding, finding sparse and
unused gradients, and the sparse row-gradient mean DDP cannot do."""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from moelab.config import ConfigError
from moelab.distributed.launch import Topology

__all__ = ["apply_fsdp2", "fsdp_no_sync", "probe_gradients", "sync_sparse_grad"]


def probe_gradients(model: nn.Module) -> tuple[list[str], list[str]]:
    """Names of the parameters whose gradient is sparse (PEER / PKM row gradients: DDP cannot
    reduce them) and of those that get none, from one backward of a two-token input in eval mode
    (no statistics, no BatchNorm update; every rank runs it, so collectives inside match)."""
    was_training = model.training
    model.eval()
    try:
        device = next(model.parameters()).device
        model(torch.zeros(1, 2, dtype=torch.long, device=device)).float().sum().backward()
        sparse = [n for n, p in model.named_parameters() if p.grad is not None and p.grad.is_sparse]
        unused = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    finally:
        model.zero_grad(set_to_none=True)
        model.train(was_training)
    return sparse, unused


def sync_sparse_grad(p: nn.Parameter, world: int) -> Tensor:
    """The mean over ranks of a sparse row gradient, still sparse: every rank's rows are
    all-gathered (padded to the longest), concatenated in rank order and summed per row, so every
    rank gets the same coalesced gradient. A rank without a gradient contributes no rows."""
    g = p.grad
    if g is None:
        g = torch.sparse_coo_tensor(
            torch.zeros(1, 0, dtype=torch.long, device=p.device),
            p.new_zeros(0, *p.shape[1:]),
            p.shape,
        )
    g = g.coalesce()
    idx, val = g.indices()[0], g.values()
    comm = torch.device("cuda", p.device.index) if p.is_cuda else torch.device("cpu")
    n = torch.tensor([idx.numel()], device=comm)
    counts = [torch.zeros_like(n) for _ in range(world)]
    dist.all_gather(counts, n)
    longest = max(int(c) for c in counts)
    pad_idx = idx.new_zeros(longest)
    pad_idx[: idx.numel()] = idx
    pad_val = val.new_zeros(longest, *val.shape[1:])
    pad_val[: idx.numel()] = val
    all_idx = [torch.empty_like(pad_idx) for _ in range(world)]
    all_val = [torch.empty_like(pad_val) for _ in range(world)]
    dist.all_gather(all_idx, pad_idx)
    dist.all_gather(all_val, pad_val)
    sizes = [int(c) for c in counts]
    rows = torch.cat([i[:s] for i, s in zip(all_idx, sizes, strict=True)])
    vals = torch.cat([v[:s] for v, s in zip(all_val, sizes, strict=True)])
    out = torch.sparse_coo_tensor(rows[None], vals, p.shape).coalesce()
    return torch.sparse_coo_tensor(out.indices(), out.values() / world, p.shape, is_coalesced=True)


def apply_fsdp2(model: nn.Module, topo: Topology, experts: set[nn.Parameter]) -> nn.Module:
    """``fully_shard`` each transformer block, then the whole model (torchtitan's recipe), over
    all ranks. Expert weights split by expert parallelism are left to it (``ignored_params``):
    each rank keeps its experts whole, their gradients are synchronised by
    :meth:`~moelab.distributed.parallel.DataParallel.finish_gradients`."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard  # heavy (DTensor): only FSDP2 runs import it

    mesh = (
        topo.mesh["edp"]  # the whole world
        if topo.ep == 1
        else init_device_mesh(topo.device.type, (topo.world_size,), mesh_dim_names=("dp",))
    )
    kwargs: dict[str, Any] = {"mesh": mesh}
    if experts:
        if "ignored_params" not in inspect.signature(fully_shard).parameters:
            raise ConfigError(
                "distributed.data_parallel",
                f"fsdp2 with expert parallelism needs a torch whose fully_shard has "
                f"ignored_params (this is {torch.__version__}); use ddp",
            )
        kwargs["ignored_params"] = experts
    for block in getattr(model, "blocks", []):
        fully_shard(block, **kwargs)
    fully_shard(model, **kwargs)
    return model


@contextlib.contextmanager
def fsdp_no_sync(model: nn.Module) -> Iterator[None]:
    model.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)
