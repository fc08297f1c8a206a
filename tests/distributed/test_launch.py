"""Start-up and failure of a launch: bad settings fail on every rank with one message, a rank
that fails ends every rank (no hang), and a run whose rank died resumes to the same curve."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from launcher import check_ok, run_ranks

from moelab.config import ConfigError
from moelab.distributed import LaunchEnv, check_layout
from moelab.rundir import RunDir
from moelab.train import RunConfig
from run_fixtures import REMOE, tiny_config

PEER = {"kind": "peer", "num_experts": 256, "heads": 2, "top_k": 4, "d_key": 16}


def env(world: int, local: int | None = None) -> LaunchEnv:
    return LaunchEnv(rank=0, world_size=world, local_rank=0, local_world_size=local or world)


@pytest.mark.parametrize(
    ("overrides", "world", "field", "text"),
    [
        (
            ["distributed.expert_parallel=3"],
            2,
            "distributed.expert_parallel",
            "number of processes",
        ),
        (
            ["distributed.expert_parallel=2", "model.ffn.num_experts=3"],
            2,
            "distributed.expert_parallel",
            "routed experts",
        ),
        (
            ["distributed.expert_parallel=2", "model.ffn.kind=dense"],
            2,
            "distributed.expert_parallel",
            "needs MoE layers",
        ),
        (["data.batch_size=6"], 4, "data.batch_size", "divisible by the number of processes (4)"),
        (["data.micro_batch_size=2"], 8, "data.micro_batch_size", "batch of each rank"),
        (["distributed.backend=nccl"], 2, "distributed.backend", "needs CUDA GPUs"),
        (
            ["distributed.data_parallel=fsdp2"],  # with a PEER model (ffn below)
            2,
            "distributed.data_parallel",
            "sparse-gradient tables",
        ),
        (
            ["distributed.expert_parallel=2", "model.ffn.capacity_factor=1.25"],
            2,
            "distributed.expert_parallel",
            "dropless",
        ),
        (
            ["distributed.expert_parallel=2", "model.ffn.eval_capacity_factor=1.25"],
            2,
            "distributed.expert_parallel",
            "set model.ffn.eval_capacity_factor to null",
        ),
    ],
)
def test_bad_layouts_name_the_setting(
    overrides: list[str], world: int, field: str, text: str, data_dir: Path
) -> None:
    ffn = PEER if text == "sparse-gradient tables" else REMOE
    cfg = tiny_config(data_dir, ffn=ffn, data={"batch_size": 8}).with_overrides(overrides)
    with pytest.raises(ConfigError) as err:
        check_layout(cfg, env(world), cuda_devices=0)
    assert err.value.field == field
    assert text in str(err.value)


def test_good_layouts_pass(data_dir: Path) -> None:
    cfg = tiny_config(data_dir, ffn=REMOE, data={"batch_size": 8, "micro_batch_size": 1})
    for ep in (1, 2, 4):
        check_layout(cfg.with_overrides([f"distributed.expert_parallel={ep}"]), env(4), 0)
    with pytest.raises(ConfigError, match="one GPU each"):
        check_layout(cfg.with_overrides(["train.device=cuda"]), env(4), cuda_devices=2)


def test_distributed_section_is_validated() -> None:
    with pytest.raises(ConfigError, match="distributed.expert_parallel: must be a positive"):
        RunConfig.from_dict({"distributed": {"expert_parallel": 0}})
    with pytest.raises(ConfigError, match="distributed.data_parallel"):
        RunConfig.from_dict({"distributed": {"data_parallel": "zero3"}})


def test_launch_env() -> None:
    assert LaunchEnv.from_env({}) is None  # not started by torchrun: one process
    full = {
        "RANK": "1",
        "WORLD_SIZE": "2",
        "LOCAL_RANK": "1",
        "MASTER_ADDR": "h",
        "MASTER_PORT": "1",
    }
    assert LaunchEnv.from_env(full) == LaunchEnv(1, 2, 1, 2)
    with pytest.raises(ConfigError, match="MASTER_ADDR, MASTER_PORT not"):
        LaunchEnv.from_env({"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0"})


@pytest.mark.parametrize("setting", ["distributed.expert_parallel=3", "distributed.backend=nccl"])
def test_bad_setting_fails_every_rank_with_one_message(
    setting: str, tmp_path: Path, data_dir: Path
) -> None:
    cfg = tiny_config(data_dir, ffn=REMOE)
    cfg_file = tmp_path / "run.yaml"
    cfg.to_yaml(cfg_file)
    argv = ["train", "--config", str(cfg_file), setting, "--run-dir", str(tmp_path / "run")]
    start = time.monotonic()
    results = run_ranks(2, "cli", {"argv": argv}, tmp=tmp_path, timeout=60)
    assert time.monotonic() - start < 40  # nobody waited for a collective
    assert [r.returncode for r in results] == [2, 2]
    stderr = "".join(r.stderr for r in results)
    assert stderr.count("moelab: error: ") == 1, stderr
    assert setting.split("=")[0] in stderr
    assert not (tmp_path / "run").exists()  # failed before touching the run directory


def test_default_run_dir_is_rank_0s(tmp_path: Path, data_dir: Path) -> None:
    """Without --run-dir each rank would name runs/<name>-<time> from its own clock; with the
    clocks 3 s apart (a busy machine) the ranks still train into rank 0's one directory."""
    cfg = tiny_config(data_dir, ffn=REMOE, train={"steps": 2}, checkpoint={"every": 2})
    cfg_file = tmp_path / "tiny.yaml"
    cfg.to_yaml(cfg_file)
    work = tmp_path / "work"
    work.mkdir()
    args = {"argv": ["train", "--config", str(cfg_file)], "cwd": str(work), "clock_skew_s": 3}
    results = run_ranks(2, "cli", args, tmp=tmp_path / "ranks", timeout=120)
    assert check_ok(results) == [0, 0]
    (run,) = (work / "runs").iterdir()  # one directory, named from rank 0's clock
    assert run.name.startswith("tiny-")
    assert f"{run.name} (new run)" in results[0].stdout
    assert [r["step"] for r in RunDir(run).read_metrics("train")] == [1, 2]
    assert RunDir(run).latest_checkpoint() is not None


def test_failing_rank_ends_every_rank(tmp_path: Path, data_dir: Path) -> None:
    """Rank 1 raises in step 3 while rank 0 waits in a collective: both exit non-zero at once,
    rank 1 with its own error, rank 0 saying that another rank failed."""
    cfg = tiny_config(
        data_dir,
        ffn=REMOE,
        data={"batch_size": 4},
        train={"steps": 6},
        distributed={"expert_parallel": 2},
    )
    args = {"config": cfg.to_dict(), "run_dir": str(tmp_path / "run"), "fail_at_step": 3}
    start = time.monotonic()
    results = run_ranks(2, "train_run", args, tmp=tmp_path / "ranks", timeout=90)
    assert time.monotonic() - start < 60
    assert all(r.returncode != 0 for r in results), [r.returncode for r in results]
    assert "injected failure at step 3" in results[1].stderr
    assert "another rank failed" in results[0].stderr


@pytest.mark.slow
def test_resume_after_a_rank_died_gives_the_same_curve(tmp_path: Path, data_dir: Path) -> None:
    """Rank 1 dies in step 4 (the run was checkpointed at step 2); resuming every rank gives
    exactly the curve (loss, λ) of a run that was never interrupted."""
    cfg = tiny_config(
        data_dir,
        ffn=REMOE,
        data={"batch_size": 4},
        train={"steps": 6},
        checkpoint={"every": 2},
        distributed={"expert_parallel": 2},
    )
    ref = check_ok(
        run_ranks(
            2,
            "train_run",
            {"config": cfg.to_dict(), "run_dir": str(tmp_path / "ref")},
            tmp=tmp_path / "r0",
        )
    )
    run = {"config": cfg.to_dict(), "run_dir": str(tmp_path / "run")}
    died = run_ranks(2, "train_run", {**run, "fail_at_step": 4}, tmp=tmp_path / "r1")
    assert all(r.returncode != 0 for r in died)
    resumed = check_ok(run_ranks(2, "train_run", {**run, "resume": True}, tmp=tmp_path / "r2"))

    def curve(ranks):
        return [
            (m["step"], m["loss"], m["lambda_next"])
            for m in ranks[0]["metrics"]
            if m["kind"] == "train"
        ]

    assert curve(resumed) == curve(ref)
    assert len(curve(resumed)) == 6
