"""RMoE, MomentumSMoE and Chain-of-Experts train a tiny model 50 steps without NaN, set from the
config exactly as the docs say (``model.ffn.router=rmoe``, ``model.ffn.momentum``, ...)."""

from __future__ import annotations

import json
import math

import pytest

from moelab.train import train
from run_fixtures import tiny_config

FFN = {"kind": "moe", "router": "topk", "num_experts": 8, "top_k": 1, "d_hidden": 32}


@pytest.mark.parametrize(
    "overrides",
    [
        ["model.ffn.router=rmoe", "model.ffn.router_options.hidden_dim=16"],
        ["model.ffn.momentum=0.7", "model.ffn.momentum_step=1.0"],
        ["model.ffn.iterations=2"],
    ],
    ids=["rmoe", "momentum", "chain"],
)
def test_trains_50_steps_without_nan(overrides, data_dir, tmp_path):
    cfg = tiny_config(data_dir, FFN, train={"steps": 50, "eval_every": 0})
    cfg = cfg.with_overrides(overrides)
    train(cfg, tmp_path / "run")
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").open()]
    losses = [r["loss"] for r in lines if r["kind"] == "train"]
    assert len(losses) == 50 and all(math.isfinite(v) for v in losses)
    assert sum(losses[-5:]) < sum(losses[:5])  # it learns
