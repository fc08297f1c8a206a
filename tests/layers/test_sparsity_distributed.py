"""The λ controller averages sparsity over data-parallel ranks (gloo, two CPU processes)."""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from moelab.layers import SparsityController
from moelab.layers.base import RoutingStats


class _Layer:
    def __init__(self, nonzero: int, total: int) -> None:
        self.last_stats = RoutingStats(
            num_tokens=torch.tensor(total // 4),
            num_experts=4,
            router_nonzero=torch.tensor(nonzero),
            router_total=torch.tensor(total),
        )


def _worker(rank: int, port: int, out: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        ctl = SparsityController(target=0.5, lambda0=1.0, alpha=2.0, per_layer=True)
        # rank 0 sees sparsities (0.9, 0.2) on 100 outputs per layer, rank 1 (0.7, 0.2) on 300
        counts = [(10, 100), (80, 100)] if rank == 0 else [(90, 300), (240, 300)]
        ctl.observe([_Layer(nz, t) for nz, t in counts])
        out[rank] = (ctl.step(), ctl.last_layer_sparsity, ctl.layer_lams)
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed unavailable")
def test_step_all_reduces_counts_across_ranks():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    manager = mp.Manager()
    out = manager.dict()
    mp.spawn(_worker, args=(port, out), nprocs=2, join=True)
    # token-weighted over ranks: layer 0: 1 - 100/400, layer 1: 1 - 320/400; overall 1 - 420/800
    for rank in (0, 1):
        sparsity, layers, lams = out[rank]
        assert sparsity == pytest.approx(1 - 420 / 800)
        assert layers == pytest.approx([0.75, 0.2])
        assert lams == [0.5, 2.0]  # both ranks take the same decision
