"""The pieces of distributed training that run in one process: the batch shards, the MoE
dispatcher seam, and the one-process setting that changes nothing."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from moelab.data import BatchSampler, TokenDataset
from moelab.distributed import GroupSum, SingleProcess, rank0_choice, setup_parallel
from moelab.distributed.rank_sum import hand_rank_sum
from moelab.layers import MoE, RouterLoadHook, SparsityController
from moelab.layers.dispatch import LocalDispatcher
from run_fixtures import tiny_config


def test_batch_shards_make_the_one_process_batch(data_dir: Path) -> None:
    ds = TokenDataset(data_dir)
    whole = BatchSampler(ds, "train", 16, 6, seed=3)
    shards = [BatchSampler(ds, "train", 16, 6, seed=3, shard=(i, 3)) for i in range(3)]
    for _ in range(3):
        x, y = whole.next_batch()
        parts = [s.next_batch() for s in shards]
        assert all(px.shape == (2, 16) for px, _ in parts)
        assert torch.equal(torch.cat([px for px, _ in parts]), x)
        assert torch.equal(torch.cat([py for _, py in parts]), y)
    with pytest.raises(ValueError, match="count dividing batch_size"):
        BatchSampler(ds, "train", 16, 6, shard=(0, 4))


def test_one_process_setting_changes_nothing(data_dir: Path, monkeypatch) -> None:
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    parallel = setup_parallel(tiny_config(data_dir), torch.device("cpu"))
    assert type(parallel) is SingleProcess and not parallel.distributed
    model = torch.nn.Linear(2, 2)
    assert parallel.parallelize(model) is model
    assert parallel.sampler_shard() is None
    assert parallel.micro_batches(8, 2) == 4
    assert parallel.reduce_step(1.5, {"a": 2.0}, {}) == (1.5, {"a": 2.0}, {})
    assert parallel.step_report() == {}


def test_parts_that_sum_over_ranks_get_the_sum_from_outside(monkeypatch) -> None:
    """One process hands nothing (the parts sum nothing) and names its run directory itself; a
    launch's sum reaches every such part of a model and the hooks, and a copy of the model
    shares it (a communicator is not copied)."""
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    moe = MoE(8, 16, 4, 2, balance_scope="global")
    aux_free = MoE(8, 16, 4, 2, router="aux_free")
    ctl, hook = SparsityController(target=0.5), RouterLoadHook.for_layers([aux_free])
    parallel = SingleProcess()
    parallel.parallelize(moe)
    parallel.connect(ctl, hook)
    assert moe.router.rank_sum is None and ctl.rank_sum is None and hook.rank_sum is None
    assert rank0_choice("runs/x-20261207-120000") == "runs/x-20261207-120000"

    group_sum = GroupSum(object(), torch.device("cpu"))  # never called here
    hand_rank_sum([moe, ctl, hook], group_sum)
    assert moe.router.rank_sum is ctl.rank_sum is hook.rank_sum is group_sum
    assert copy.deepcopy(moe).router.rank_sum is group_sum


class CountingDispatcher(LocalDispatcher):
    """A dispatcher plugged in from outside, as expert parallelism's is."""

    calls = 0

    def run(self, x_TD, decision, experts):
        type(self).calls += 1
        return super().run(x_TD, decision, experts)


def test_moe_runs_the_dispatcher_it_is_given() -> None:
    torch.manual_seed(0)
    moe = MoE(16, 32, 4, 2, router="relu")
    assert isinstance(moe.dispatcher, LocalDispatcher)
    other = copy.deepcopy(moe)
    other.dispatcher = CountingDispatcher()
    x = torch.randn(3, 5, 16)
    assert torch.equal(other(x), moe(x))
    assert CountingDispatcher.calls == 1
    assert "dispatcher" not in "".join(moe.state_dict())
