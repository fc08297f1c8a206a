"""Gradient accumulation gives the full batch's gradient; λ is stepped once per optimizer step."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from moelab.train import Trainer
from run_fixtures import REMOE, TOPK, tiny_config


def grads_after_one_batch(cfg, run_dir: Path) -> tuple[dict[str, torch.Tensor], dict]:
    trainer = Trainer(cfg, run_dir)
    x, y = trainer.sampler.next_batch()
    record = trainer.accumulate_gradients(x, y)
    grads = {n: p.grad.detach().clone() for n, p in trainer.model.named_parameters()}
    return grads, record


@pytest.mark.parametrize(
    "ffn",
    [
        {"kind": "dense", "d_hidden": 64},
        # z-loss is a per-token mean (linear in the tokens); the Switch balance loss f·P is not,
        # so it is off here (it is defined per forward, as in Megatron / the ReMoE paper).
        {**TOPK, "balance_coef": 0.0, "z_loss_coef": 1e-2},
        # plain L1 is linear; the load-balanced L1 weights by per-forward expert frequencies.
        {**REMOE, "l1_balanced": False},
    ],
    ids=["dense", "topk-zloss", "remoe-plain-l1"],
)
def test_accumulation_equals_full_batch(tmp_path: Path, data_dir: Path, ffn: dict) -> None:
    full = tiny_config(data_dir, ffn=ffn, data={"batch_size": 4})
    split = tiny_config(data_dir, ffn=ffn, data={"batch_size": 4, "micro_batch_size": 2})
    g1, r1 = grads_after_one_batch(full, tmp_path / "full")
    g2, r2 = grads_after_one_batch(split, tmp_path / "split")
    assert r1["loss"] == pytest.approx(r2["loss"], rel=1e-6)
    for name, value in r1["aux"].items():
        assert r2["aux"][name] == pytest.approx(value, rel=1e-5), name
    if ffn["kind"] == "moe":
        # per-step statistics are the micro-batches' sum: same counts as one big forward
        for key, st in r1["layers"].items():
            assert r2["layers"][key]["tokens_per_expert"] == st["tokens_per_expert"]
            assert r2["layers"][key]["num_tokens"] == st["num_tokens"] == 4 * 16
    for name in g1:
        torch.testing.assert_close(g2[name], g1[name], rtol=1e-4, atol=1e-7, msg=name)


def test_controller_steps_once_per_optimizer_step(tmp_path: Path, data_dir: Path) -> None:
    cfg = tiny_config(data_dir, ffn=REMOE, data={"batch_size": 4, "micro_batch_size": 1})
    trainer = Trainer(cfg, tmp_path / "run")
    ctrl = trainer.controller
    assert ctrl is not None and ctrl.target == pytest.approx(0.75)
    calls = {"observe": 0, "step": 0}
    observe, step = ctrl.observe, ctrl.step

    def counting_observe(layers):
        calls["observe"] += 1
        return observe(layers)

    def counting_step():
        calls["step"] += 1
        return step()

    ctrl.observe, ctrl.step = counting_observe, counting_step
    lam0 = ctrl.lam
    for _ in range(3):
        record = trainer.train_step()
    assert calls == {"observe": 12, "step": 3}  # 4 micro-batches per step, one λ update per step
    assert ctrl.steps == 3
    # the sparsity the controller saw is that of all micro-batches and layers together
    layers = record["layers"].values()
    nonzero = sum((1 - st["sparsity"]) * st["num_tokens"] * 4 for st in layers)
    total = sum(st["num_tokens"] * 4 for st in layers)
    assert record["sparsity"] == pytest.approx(1 - nonzero / total)
    assert record["lambda"] != lam0 and record["lambda_next"] == ctrl.lam


def test_per_layer_lambda_option(tmp_path: Path, data_dir: Path) -> None:
    cfg = tiny_config(data_dir, ffn=REMOE, train={"lambda_per_layer": True, "lambda0": 1e-3})
    trainer = Trainer(cfg, tmp_path / "run")
    n_layers = len(trainer.layers)
    record = trainer.train_step()
    lams = record["lambda_layers"]
    assert len(lams) == n_layers == len(trainer.controller.last_layer_sparsity)
    for lam, s in zip(lams, trainer.controller.last_layer_sparsity, strict=True):
        assert lam == pytest.approx(1e-3 * (1.2 if s < 0.75 else 1 / 1.2), rel=1e-6)


def test_no_controller_without_relu_router(tmp_path: Path, data_dir: Path) -> None:
    trainer = Trainer(tiny_config(data_dir, ffn=TOPK), tmp_path / "run")
    assert trainer.controller is None
    record = trainer.train_step()
    assert "lambda" not in record and set(record["aux"]) == {"load_balance"}


def test_peer_trains_with_sparse_rows_and_resumes(tmp_path: Path, data_dir: Path) -> None:
    """PEER's sparse row gradients go through clipping, AdamW and an exact resume."""
    from moelab.rundir import RunDir
    from moelab.train import train

    peer = {"kind": "peer", "num_experts": 256, "heads": 2, "top_k": 4, "d_key": 16}
    cfg = tiny_config(data_dir, ffn=peer, train={"steps": 4})
    train(cfg, tmp_path / "full")
    train(cfg, tmp_path / "resumed", stop_after=2)
    train(cfg, tmp_path / "resumed", resume=True)
    full, resumed = (
        [(r["loss"], r["grad_norm"]) for r in RunDir(tmp_path / name).read_metrics("train")]
        for name in ("full", "resumed")
    )
    assert len(full) == 4 and resumed == full
    assert full[-1][0] < full[0][0]
