"""The token-choice routers from the literature train through the unchanged trainer and configs;
aux-loss-free balancing's bias is checkpointed and a resumed run continues identically."""

from __future__ import annotations

import pytest
import torch

from moelab.layers import RouterLoadHook
from moelab.model import TransformerLM
from moelab.rundir import RunDir
from moelab.train import train
from router_checks import train_steps
from run_fixtures import tiny_config

# topk-tiny's matched active compute: E=8, k=1 (d_hidden shrunk for speed)
BASE = {"kind": "moe", "num_experts": 8, "top_k": 1, "d_hidden": 32}
COMPARED = ("step", "tokens", "lr", "loss", "aux", "grad_norm", "layers")


@pytest.mark.parametrize(
    "router, overrides",
    [
        ("top_p", ["model.ffn.router_options.p=0.4"]),
        ("null", ["model.ffn.top_k=2", "model.ffn.router_options.null_experts=8"]),
        ("aux_free", ["model.ffn.router_options.seq_balance_coef=0.0001"]),
        ("sparsemixer", ["model.ffn.top_k=2"]),
        (
            "topk",
            [
                "model.ffn.router_options.balance_scope=sequence",
                "model.ffn.router_options.jitter_eps=0.01",
                "model.ffn.z_loss_coef=0.001",
            ],
        ),
    ],
)
def test_trains_50_steps_without_nan(router, overrides, data_dir, tmp_path):
    ffn = BASE | {"router": router}
    if router == "aux_free":  # top-1: a normalised gate would always be 1
        ffn["router_options"] = {"normalize": False}
    records = train_steps(data_dir, tmp_path / "run", ffn, steps=50, overrides=overrides)
    assert sum(r["loss"] for r in records[-5:]) < sum(r["loss"] for r in records[:5])


def _records(run) -> list[dict]:
    return [{k: r.get(k) for k in COMPARED} for r in RunDir(run).read_metrics("train")]


def test_aux_free_bias_is_checkpointed_and_resume_continues_identically(data_dir, tmp_path):
    ffn = BASE | {"router": "aux_free", "router_options": {"normalize": False}}
    cfg = tiny_config(data_dir, ffn, train={"steps": 4, "eval_every": 0})
    cfg = cfg.with_overrides(
        [
            "model.ffn.router_options.bias_update_rate=0.05",
            "data.micro_batch_size=2",
        ]
    )
    train(cfg, tmp_path / "full")
    first = train(cfg, tmp_path / "resumed", stop_after=2)
    assert first["interrupted"]
    model = TransformerLM(cfg.model)
    _, state = RunDir(tmp_path / "resumed").load_checkpoint(model)
    assert state[RouterLoadHook.name] == {"steps": 2}
    biases_at_2 = [b.ffn.router.bias_E.clone() for b in model.blocks]
    assert all(b.abs().sum() > 0 for b in biases_at_2)  # moved, in multiples of 0.05
    for b in biases_at_2:
        torch.testing.assert_close(b / 0.05, (b / 0.05).round())
    train(cfg, tmp_path / "resumed", resume=True)
    assert _records(tmp_path / "resumed") == _records(tmp_path / "full")
    full, resumed = TransformerLM(cfg.model), TransformerLM(cfg.model)
    RunDir(tmp_path / "full").load_checkpoint(full)
    RunDir(tmp_path / "resumed").load_checkpoint(resumed)
    for a, b in zip(full.blocks, resumed.blocks, strict=True):
        assert torch.equal(a.ffn.router.bias_E, b.ffn.router.bias_E)
