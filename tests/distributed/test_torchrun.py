"""``torchrun --nproc_per_node 2 -m moelab train ...``: the real launcher and the real command
line; the run directory is written once (rank 0), progress printed once, with global tokens."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from launcher import SRC, free_port

from moelab.rundir import RunDir
from run_fixtures import REMOE, tiny_config


def test_torchrun_train(tmp_path: Path, data_dir: Path) -> None:
    cfg = tiny_config(
        data_dir,
        ffn=REMOE,
        data={"batch_size": 4},
        train={"steps": 4},
        logging={"log_every": 2, "progress": True},
        distributed={"expert_parallel": 2},
    )
    cfg_file = tmp_path / "run.yaml"
    cfg.to_yaml(cfg_file)
    run = tmp_path / "run"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        str(free_port()),
        "-m",
        "moelab",
        "train",
        "--config",
        str(cfg_file),
        "--run-dir",
        str(run),
    ]
    env = {**os.environ, "PYTHONPATH": str(SRC), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    out = done.stdout
    assert out.count(f"run        {run} (new run)") == 1
    assert "parallel   2 processes (ddp, gloo), experts split over 2 ranks x 1 copies" in out
    assert out.count("step 4/4") == 1 and out.count("done ") == 1
    rundir = RunDir(run)
    steps = [r["step"] for r in rundir.read_metrics("train")]
    assert steps == [2, 4]  # one line per logged step, not one per rank
    summary = rundir.read_summary()
    assert summary["distributed"] == {
        "world_size": 2,
        "data_parallel": "ddp",
        "expert_parallel": 2,
        "backend": "gloo",
    }
    assert summary["tokens"] == 4 * 4 * 16  # global tokens: steps x batch_size x seq_len
    assert len(rundir.provenance()) == 1
    assert rundir.is_sharded(rundir.latest_checkpoint())
    assert json.loads((run / RunDir.ACCOUNTING).read_text())["total_params"] > 0
