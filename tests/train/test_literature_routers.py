"""The routers from the literature train a tiny model 50 steps without NaN, through the configs."""

from __future__ import annotations

import json
import math

import pytest

from model_checks import tiny_lm_config
from moelab.train import train
from run_fixtures import tiny_config

ROUTERS = {
    "hash": [],
    "expert_choice": [],
    "moepp": ["model.ffn.router_options.zero_experts=1"],
}


@pytest.mark.parametrize("router", list(ROUTERS))
def test_trains_50_steps_without_nan(router, data_dir, tmp_path):
    ffn = {"kind": "moe", "router": router, "num_experts": 4, "top_k": 1, "d_hidden": 32}
    cfg = tiny_config(data_dir, ffn, train={"steps": 50, "eval_every": 0}).with_overrides(
        ROUTERS[router]
    )
    assert cfg.method == router
    train(cfg, tmp_path / "run")
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").open()]
    losses = [r["loss"] for r in lines if r["kind"] == "train"]
    assert len(losses) == 50 and all(math.isfinite(v) for v in losses)
    assert losses[-1] < losses[0]


def test_expert_choice_refuses_the_block_capacity_factor(data_dir, tmp_path):
    ffn = {
        "kind": "moe",
        "router": "expert_choice",
        "num_experts": 4,
        "d_hidden": 32,
        "capacity_factor": 1.0,
    }
    with pytest.raises(ValueError, match="model.ffn.capacity_factor: must be None"):
        train(tiny_config(data_dir, ffn), tmp_path / "run")  # refused by the config, at load
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("router", list(ROUTERS))
def test_every_parameter_gets_a_gradient_for_ddp(router):
    """DDP's probe (one eval-mode backward) finds no parameter without a gradient: Hash has no
    router parameter, MoE++'s first layer keeps its gating-residual map in the graph."""
    from moelab.distributed.wrapping import probe_gradients
    from moelab.model import TransformerLM

    assert probe_gradients(TransformerLM(tiny_lm_config(router))) == ([], [])
