"""Checkpoints of runs on several processes (torch.distributed.checkpoint): written once per
shard, read back in the same or another layout, by evaluation and analysis in one process."""

from __future__ import annotations

import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from launcher import check_ok, run_ranks

from moelab.checkpoint_io import load_state
from moelab.config import ConfigError
from moelab.distributed import load_checkpoint
from moelab.rundir import RunDir
from moelab.train import evaluate_run, load_run, train
from run_fixtures import REMOE, TOPK, tiny_config


def config(data_dir: Path, ffn: dict, micro: int | None = None, **distributed):
    return tiny_config(
        data_dir,
        ffn=ffn,
        data={"batch_size": 4, "micro_batch_size": micro},
        train={"steps": 4},
        checkpoint={"every": 2},
        distributed=distributed,
    )


def curve(run_dir: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in RunDir(run_dir).read_metrics("train")]


def test_sharded_run_resumes_in_one_process(tmp_path: Path, data_dir: Path) -> None:
    """Saved by 2 ranks with the experts split over them, resumed by one process (whose two
    micro-batches are the ranks' halves): the curve of a one-process run."""
    run = tmp_path / "run"
    args = {"config": config(data_dir, TOPK, expert_parallel=2).to_dict(), "run_dir": str(run)}
    check_ok(run_ranks(2, "train_run", {**args, "stop_after": 2}, tmp=tmp_path / "ranks"))
    ckpt = RunDir(run).latest_checkpoint()
    assert RunDir(run).is_sharded(ckpt) and not (ckpt / RunDir.WEIGHTS).exists()
    shapes = RunDir(run).sharded_shapes(ckpt)
    assert shapes["model.blocks.0.ffn.experts.w13_EDF2"][0] == 4  # whole tensors, not shards
    model, cfg = load_run(run)  # evaluation and analysis read it in one process
    assert model.blocks[0].ffn.experts.w13_EDF2.shape[0] == 4
    assert cfg.distributed.expert_parallel == 2
    assert evaluate_run(run, max_batches=1)["val_loss"] > 0

    train(config(data_dir, TOPK, micro=2), run, resume=True)
    train(config(data_dir, TOPK, micro=2), tmp_path / "one")
    got, want = curve(run), curve(tmp_path / "one")
    assert [s for s, _ in got] == [1, 2, 3, 4]
    for (_, a), (_, b) in zip(got, want, strict=True):
        assert a == pytest.approx(b, rel=1e-5)


def test_one_process_checkpoint_resumes_on_two_ranks(tmp_path: Path, data_dir: Path) -> None:
    """A run started in one process continues under torchrun with DDP (whole weights on every
    rank): the curve of one process whose micro-batches are the ranks' halves."""
    run = tmp_path / "run"
    train(config(data_dir, REMOE, micro=2), run, stop_after=2)
    args = {"config": config(data_dir, REMOE).to_dict(), "run_dir": str(run), "resume": True}
    ranks = check_ok(run_ranks(2, "train_run", args, tmp=tmp_path / "ddp"))
    train(config(data_dir, REMOE, micro=2), tmp_path / "one")
    got = [(r["step"], r["loss"]) for r in ranks[0]["metrics"] if r["kind"] == "train"]
    want = curve(tmp_path / "one")
    assert [s for s, _ in got] == [1, 2, 3, 4]
    for (_, a), (_, b) in zip(got, want, strict=True):
        assert a == pytest.approx(b, rel=1e-5)
    assert RunDir(run).is_sharded(RunDir(run).latest_checkpoint())  # step 4: written by 2 ranks


def test_one_process_checkpoint_refused_with_split_experts(tmp_path: Path, data_dir: Path) -> None:
    """Whole weights cannot be loaded into ranks that hold a part of the experts: one line says
    what works instead."""
    run = tmp_path / "run"
    train(config(data_dir, REMOE), run, stop_after=2)
    model, _ = load_run(run)
    split = SimpleNamespace(sharded={"blocks.0.ffn.experts.w2_EFD": None}, layout=dict)
    with pytest.raises(ConfigError, match="distributed.expert_parallel=1 .* or in one process"):
        load_checkpoint(RunDir(run), model, torch.optim.SGD(model.parameters()), split)


@pytest.mark.slow
@pytest.mark.parametrize("expert_parallel", [1, 4])
def test_two_rank_checkpoint_resumes_on_four_ranks(
    expert_parallel: int, tmp_path: Path, data_dir: Path
) -> None:
    """Experts split over 2 ranks when saved; over 4, or not at all, when resumed."""
    run = tmp_path / "run"
    saved = config(data_dir, REMOE, expert_parallel=2).to_dict()
    check_ok(
        run_ranks(
            2,
            "train_run",
            {"config": saved, "run_dir": str(run), "stop_after": 2},
            tmp=tmp_path / "two",
        )
    )
    shutil.copytree(run, tmp_path / "copy")
    resumed = config(data_dir, REMOE, expert_parallel=expert_parallel).to_dict()
    ranks = check_ok(
        run_ranks(
            4,
            "train_run",
            {"config": resumed, "run_dir": str(run), "resume": True},
            tmp=tmp_path / "four",
            timeout=300,
        )
    )
    train(config(data_dir, REMOE, micro=1), tmp_path / "one")  # 4 forwards of 1 sequence
    got = [(r["step"], r["loss"]) for r in ranks[0]["metrics"] if r["kind"] == "train"]
    want = curve(tmp_path / "one")
    assert [s for s, _ in got] == [1, 2, 3, 4]
    for (_, a), (_, b) in zip(got[2:], want[2:], strict=True):
        assert a == pytest.approx(b, rel=2e-3)  # steps 1-2 ran as 2 forwards of 2 sequences


@pytest.mark.slow
def test_each_rank_resumes_its_own_random_stream(tmp_path: Path, data_dir: Path) -> None:
    """Ranks that draw different amounts of random numbers (here: rank r draws r + 1 per forward)
    continue their own streams after a resume on the same ranks: the uninterrupted curve, bit for
    bit (with rank 0's stream on every rank, rank 1's draws would differ)."""
    cfg = config(data_dir, TOPK).to_dict()
    args = {"config": cfg, "noisy_ranks": True}
    check_ok(
        run_ranks(2, "train_run", {**args, "run_dir": str(tmp_path / "full")}, tmp=tmp_path / "a")
    )
    run = {**args, "run_dir": str(tmp_path / "run")}
    check_ok(run_ranks(2, "train_run", {**run, "stop_after": 2}, tmp=tmp_path / "b"))
    state = load_state(RunDir(tmp_path / "run").latest_checkpoint() / RunDir.STATE)
    assert len(state["rng_by_rank"]) == 2
    assert not torch.equal(state["rng_by_rank"][0]["torch"], state["rng_by_rank"][1]["torch"])
    check_ok(run_ranks(2, "train_run", {**run, "resume": True}, tmp=tmp_path / "c"))
    assert curve(tmp_path / "run") == curve(tmp_path / "full")
    assert [s for s, _ in curve(tmp_path / "run")] == [1, 2, 3, 4]
