"""The gradient-clipping norm of a launch whose gradients are split over ranks (experts under
expert parallelism, FSDP2 shards) is the one-process norm: the same gradients, whole in one
process and split by the layout, give the same norm to 1e-7 relative and the same clipped
gradients. (Squared ``vector_norm`` per tensor, as before, was off by up to 1e-3 on the CPU.)"""

from __future__ import annotations

from pathlib import Path

import pytest
from launcher import check_ok, run_ranks

from run_fixtures import TOPK, tiny_config

LAYOUTS = [
    pytest.param(2, {"expert_parallel": 2}, id="ep2"),
    pytest.param(2, {"data_parallel": "fsdp2"}, id="fsdp2"),
    pytest.param(
        2, {"data_parallel": "fsdp2", "expert_parallel": 2}, id="fsdp2-ep2", marks=pytest.mark.slow
    ),
    pytest.param(4, {"expert_parallel": 4}, id="ep4", marks=pytest.mark.slow),
    pytest.param(4, {"expert_parallel": 2}, id="ep2x2", marks=pytest.mark.slow),
    pytest.param(  # FSDP2 also shards each expert block over its 2 copies
        4,
        {"data_parallel": "fsdp2", "expert_parallel": 2},
        id="fsdp2-ep2x2",
        marks=pytest.mark.slow,
    ),
]


@pytest.mark.parametrize(("world", "distributed"), LAYOUTS)
def test_clip_norm_is_the_one_process_norm(world: int, distributed: dict, tmp_path: Path) -> None:
    ffn = {**TOPK, "num_experts": 4 * world // 2}
    cfg = tiny_config(tmp_path / "unused", ffn=ffn, distributed=distributed)
    args = {"config": cfg.to_dict(), "max_norm": 1e-3}  # clipped: the coefficient is checked too
    for got in check_ok(run_ranks(world, "clip_norm", args, tmp=tmp_path, timeout=300)):
        assert got["got"] == pytest.approx(got["want"], rel=1e-7, abs=0)
        assert got["clipped"] < 1e-6
