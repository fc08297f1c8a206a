"""Lory trains a tiny model 50 steps without NaN, set from the config exactly as the docs say
(``model.ffn.router=lory model.ffn.router_options.segment_len=...``)."""

from __future__ import annotations

import json
import math

import pytest

from moelab.train import train
from run_fixtures import tiny_config

FFN = {"kind": "moe", "router": "topk", "num_experts": 8, "top_k": 1, "d_hidden": 32}


@pytest.mark.parametrize("first_segment", ["uniform", "self"])
def test_trains_50_steps_without_nan(first_segment, data_dir, tmp_path):
    cfg = tiny_config(data_dir, FFN, train={"steps": 50, "eval_every": 0})
    cfg = cfg.with_overrides(
        [
            "model.ffn.router=lory",
            "model.ffn.router_options.segment_len=4",  # seq_len 16: four segments
            f"model.ffn.router_options.first_segment={first_segment}",
        ]
    )
    train(cfg, tmp_path / "run")
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").open()]
    losses = [r["loss"] for r in lines if r["kind"] == "train"]
    assert len(losses) == 50 and all(math.isfinite(v) for v in losses)
    assert sum(losses[-5:]) < sum(losses[:5])  # it learns
