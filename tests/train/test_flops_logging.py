"""Training logs the forward FLOPs it really spent: per step, per layer and cumulative."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from moelab.train import Trainer, train
from run_fixtures import REMOE, TOPK, tiny_config


def train_lines(run_dir: Path) -> list[dict]:
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in lines if r["kind"] == "train"]


def test_topk_logs_nominal_flops_and_their_running_sum(tmp_path: Path, data_dir: Path) -> None:
    cfg = tiny_config(data_dir, ffn=TOPK, train={"steps": 3, "eval_every": 1})
    summary = train(cfg, tmp_path / "run")
    acc = json.loads((tmp_path / "run" / "accounting.json").read_text())
    tokens = 4 * 16
    lines = train_lines(tmp_path / "run")
    assert [r["step"] for r in lines] == [1, 2, 3]
    running = 0.0
    for r in lines:  # TopK runs k experts for every token: measured is the nominal count
        assert r["flops"]["step"] == acc["flops_per_token"] * tokens
        assert r["flops"]["per_token"] == acc["flops_per_token"]
        per_layer = [st["expert_flops"] for st in r["layers"].values()]
        assert per_layer == [tokens * 2 * acc["routed_layers"][0]["assignment_flops"]] * 2
        running += r["flops"]["step"]
        assert r["flops_total"] == running  # cumulative = sum over steps
    assert summary["flops_total"] == running
    assert summary["params"]["measured_flops_per_token"] == acc["flops_per_token"]


def test_remoe_flops_follow_its_decisions(tmp_path: Path, data_dir: Path) -> None:
    cfg = tiny_config(data_dir, ffn=REMOE, train={"steps": 2})
    train(cfg, tmp_path / "run")
    acc = json.loads((tmp_path / "run" / "accounting.json").read_text())
    fixed = acc["flops_per_token"] - acc["routed_flops_per_token"]
    per = acc["routed_layers"][0]["assignment_flops"]
    for r in train_lines(tmp_path / "run"):
        layers = r["layers"].values()
        # the layer's active experts (its decision) x per-assignment FLOPs, and nothing else
        assert [st["expert_flops"] for st in layers] == [
            st["active_mean"] * st["num_tokens"] * per for st in layers
        ]
        spent = sum(st["expert_flops"] for st in layers)
        assert r["flops"]["step"] == pytest.approx(fixed * 64 + spent, rel=1e-12)


def test_accumulation_does_not_double_count(tmp_path: Path, data_dir: Path) -> None:
    full = tiny_config(data_dir, ffn=REMOE, data={"batch_size": 4})
    split = tiny_config(data_dir, ffn=REMOE, data={"batch_size": 4, "micro_batch_size": 1})
    records = []
    for name, cfg in (("full", full), ("split", split)):
        trainer = Trainer(cfg, tmp_path / name)
        records.append(trainer.train_step())
        trainer.close()
    a, b = records
    assert b["flops"]["step"] == pytest.approx(a["flops"]["step"], rel=1e-12)
    for key, st in a["layers"].items():
        assert b["layers"][key]["expert_flops"] == st["expert_flops"]


def test_eval_forwards_are_not_counted(tmp_path: Path, data_dir: Path) -> None:
    quiet = tiny_config(data_dir, ffn=REMOE, train={"steps": 3, "eval_every": 0})
    busy = tiny_config(data_dir, ffn=REMOE, train={"steps": 3, "eval_every": 1})
    train(quiet, tmp_path / "quiet")
    train(busy, tmp_path / "busy")
    a, b = train_lines(tmp_path / "quiet"), train_lines(tmp_path / "busy")
    assert [r["flops_total"] for r in b] == pytest.approx([r["flops_total"] for r in a])


def test_resume_continues_the_running_sum(tmp_path: Path, data_dir: Path) -> None:
    cfg = tiny_config(data_dir, ffn=REMOE, train={"steps": 4}, checkpoint={"every": 2})
    train(cfg, tmp_path / "once")
    train(cfg, tmp_path / "twice", stop_after=2)
    summary = train(cfg, tmp_path / "twice", resume=True)
    once = train_lines(tmp_path / "once")
    assert summary["flops_total"] == pytest.approx(once[-1]["flops_total"], rel=1e-12)
