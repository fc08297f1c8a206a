"""How a data-parallel model is wrapped and its gradients made whole, apart from the trainer's
view of parallelism (:mod:`moelab.distributed.parallel`): FSDP2 sharding, finding sparse and
unused gradients, and the sparse row-gradient mean DDP cannot do."""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from moelab.config import ConfigError
from moelab.distributed.launch import Topology

if TYPE_CHECKING:
    from torch.distributed.device_mesh import DeviceMesh

__all__ = [
    "apply_fsdp2",
    "expert_mesh",
    "fsdp_no_sync",
    "probe_gradients",
    "split_grad_norm_",
    "sync_sparse_grad",
]


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


def apply_fsdp2(model: nn.Module, topo: Topology, experts: set[nn.Parameter]) -> bool:
    """``fully_shard`` each transformer block, then the whole model (torchtitan's recipe), over
    all ranks. Returns whether the expert weights were sharded too.

    Expert weights split by expert parallelism are not part of that mesh. When ``edp > 1`` (each
    expert block held by ``edp`` ranks, a mesh column), each module holding them is first
    ``fully_shard``-ed over its column, as torchtitan does: a rank keeps ``1 / edp`` of its block,
    FSDP2 all-gathers the block around the experts' forward and backward and reduce-scatters their
    gradients over the column, divided by ``world`` (the all-to-all's backward has already summed
    the expert-parallel group: together ``1/world · Σ_r ∂L_r/∂W``, DDP's average). With
    ``edp == 1`` there is nothing to shard them over: they stay whole (``ignored_params``) and
    :meth:`~moelab.distributed.parallel.DataParallel.finish_gradients` scales their gradients."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard  # heavy (DTensor): only FSDP2 runs import it

    mesh = (
        topo.mesh["edp"]  # the whole world
        if topo.ep == 1
        else init_device_mesh(topo.device.type, (topo.world_size,), mesh_dim_names=("dp",))
    )
    kwargs: dict[str, Any] = {"mesh": mesh}
    shard_experts = bool(experts) and topo.edp > 1
    if shard_experts:
        holders = [
            m for m in model.modules() if any(p in experts for p in m.parameters(recurse=False))
        ]
        for module in holders:  # before the blocks: their fully_shard skips these parameters
            fully_shard(module, mesh=topo.mesh["edp"])
            module.set_gradient_divide_factor(float(topo.world_size))
            module.set_force_sum_reduction_for_comms(True)  # sum, then divide (gloo has no premul)
    elif experts:
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
    return shard_experts


@contextlib.contextmanager
def fsdp_no_sync(model: nn.Module) -> Iterator[None]:
    model.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)


def expert_mesh(topo: Topology) -> DeviceMesh:
    """The launch's ranks as an ``(ep, edp)`` mesh (the ``(edp, ep)`` mesh transposed): with
    placements ``(Shard(0), Shard(0))`` on it, rank ``(i, j)`` of ``(edp, ep)`` holds rows
    ``[j·E/ep, (j+1)·E/ep)`` split ``edp`` ways, part ``i`` - where FSDP2 over a mesh column
    puts the rows of an expert block. Checkpoints address the experts' shards with it. Every rank
    must call it (it builds process groups)."""
    from torch.distributed.device_mesh import DeviceMesh

    ranks = topo.mesh.mesh.transpose(0, 1).contiguous()
    return DeviceMesh(topo.device.type, ranks, mesh_dim_names=("ep", "edp"))


def split_grad_norm_(
    params: list[nn.Parameter],
    max_norm: float,
    *,
    experts: set[int],
    ep_group: dist.ProcessGroup | None,
    fsdp: bool,
    comm_device: torch.device,
) -> float:
    """Clip to ``max_norm`` the global gradient norm of parameters split over ranks; returns the
    norm before clipping, computed as one process computes it
    (:func:`moelab.train.optim.clip_grad_norm_`): one float32 ``g.float().pow(2).sum()`` per
    parameter, in parameter order, then the float32 sum of those that have a gradient and its
    square root. A parameter split over ranks (an FSDP2 ``DTensor``: over all ranks; an expert
    block, ``id`` in ``experts``: over ``ep_group``) contributes the sum of its parts' squares;
    every other entry is this rank's own, bit for bit one process's. (Squaring a float32
    ``vector_norm`` per tensor is not: up to ~1e-3 relative off on large CPU gradients.)"""
    squares, split_by = [], []  # one entry per parameter: the same length on every rank
    for p in params:
        g = p.grad
        if g is not None and g.is_sparse:
            g = p.grad = g.coalesce()
            g = g._values()
        if g is not None and hasattr(g, "to_local"):  # an FSDP2 DTensor: this rank's shard
            g = g.to_local()
        squares.append(torch.zeros(()) if g is None else g.detach().float().pow(2).sum().cpu())
        split_by.append(
            "world" if hasattr(p, "to_local") else "ep" if id(p) in experts else "local"
        )
    sq = torch.stack(squares)
    for where, group, used in (
        ("world", dist.group.WORLD, fsdp),
        ("ep", ep_group, bool(experts)),
    ):
        if used:  # decided by the layout, the same on every rank
            mask = torch.tensor([w == where for w in split_by])
            part = torch.where(mask, sq, torch.zeros_like(sq)).to(comm_device)
            dist.all_reduce(part, group=group)
            sq = torch.where(mask, part.cpu(), sq)
    has_grad = [p.grad is not None for p in params]
    if not any(has_grad):
        return 0.0
    total = sq[torch.tensor(has_grad)].sum().sqrt()  # the one-process sum: these entries only
    coef = (max_norm / (total + 1e-6)).clamp(max=1.0)
    if coef < 1.0:
        for p, has in zip(params, has_grad, strict=True):
            if has:
                g = p.grad._values() if p.grad.is_sparse else p.grad
                g = g.to_local() if hasattr(g, "to_local") else g
                g.mul_(coef.to(g.device, g.dtype))
    return float(total)
