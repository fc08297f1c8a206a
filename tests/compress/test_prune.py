"""Expert pruning: exact where the routing makes it exact, the most-used experts kept, clear
refusals, and the command end to end on a tiny run."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from model_checks import TINY_LM_64
from moelab.cli import main
from moelab.compress import expert_usage, prune_experts
from moelab.compress.prune import kept_experts
from moelab.model import ModelConfig, TransformerLM
from moelab.rundir import RunDir
from moelab.train import load_run, train
from run_fixtures import tiny_config


def _model(**ffn) -> TransformerLM:
    torch.manual_seed(0)
    spec = {"kind": "moe", "num_experts": 8, "top_k": 1, "d_hidden": 32} | ffn
    return TransformerLM(ModelConfig.from_dict(TINY_LM_64 | {"ffn": spec})).eval()


def _idle_experts_dropped_exactly(model: TransformerLM, keep: int) -> None:
    """On a few tokens most experts are never used; dropping them must not change the logits."""
    ids = torch.randint(0, 64, (1, 5), generator=torch.Generator().manual_seed(1))
    usage = expert_usage(model, [ids])
    unused = min(int((u == 0).sum()) for u in usage.values())
    assert unused >= model.cfg.ffn.num_experts * model.cfg.ffn.granularity - keep  # premise
    pruned, kept = prune_experts(model, keep, usage)
    assert pruned.cfg.ffn.num_experts * pruned.cfg.ffn.granularity == keep
    for block, ids_kept in kept.items():
        assert set(torch.nonzero(usage[block]).flatten().tolist()) <= set(ids_kept)
    with torch.no_grad():
        torch.testing.assert_close(pruned(ids), model(ids), rtol=1e-6, atol=1e-6)


def test_relu_routing_drops_idle_experts_exactly():
    model = _model(router="relu")
    with torch.no_grad():  # experts 0-4 never fire: ReLU of a zero router row is 0
        for block in model.blocks:
            block.ffn.router.weight[:5] = 0.0
    _idle_experts_dropped_exactly(model, keep=3)


@pytest.mark.parametrize("granularity", [1, 2])
def test_topk_with_renormalize_drops_unchosen_experts_exactly(granularity):
    model = _model(router="topk", renormalize=True, granularity=granularity, top_k=1)
    _idle_experts_dropped_exactly(model, keep=6 * granularity)


def test_the_most_used_experts_are_kept_in_their_order():
    assert kept_experts(torch.tensor([5, 0, 9, 9, 1, 7]), 3).tolist() == [2, 3, 5]
    assert kept_experts(torch.tensor([2, 2, 2, 2]), 2).tolist() == [0, 1]  # ties: lower id


def test_router_rows_and_expert_weights_follow_the_kept_ids():
    model = _model(router="topk")
    usage = {i: torch.arange(8) for i in (0, 1)}  # experts 5, 6, 7 the most used
    pruned, kept = prune_experts(model, 3, usage)
    assert kept == {0: [5, 6, 7], 1: [5, 6, 7]}
    for old, new in zip(model.blocks, pruned.blocks, strict=True):
        torch.testing.assert_close(new.ffn.router.weight, old.ffn.router.weight[5:])
        torch.testing.assert_close(new.ffn.experts.w13_EDF2, old.ffn.experts.w13_EDF2[5:])
        torch.testing.assert_close(new.ffn.experts.w2_EFD, old.ffn.experts.w2_EFD[5:])
        torch.testing.assert_close(new.attn.wq.weight, old.attn.wq.weight)


@pytest.mark.parametrize(
    ("ffn", "keep", "message"),
    [
        ({"kind": "dense", "d_hidden": 32}, 2, "model: no MoE layer"),
        ({"router": "lory"}, 4, "model.ffn.router: router 'lory' cannot be pruned"),
        ({"router": "topk", "top_k": 2}, 1, r"keep: must be an integer from top_k x granularity"),
        ({"router": "topk"}, 9, r"to the routed experts \(8\), got 9"),
        ({"router": "topk", "granularity": 2}, 5, "keep: must be a multiple of the granularity"),
    ],
)
def test_bad_settings_are_refused(ffn, keep, message):
    if ffn.get("kind") == "dense":
        torch.manual_seed(0)
        model = TransformerLM(ModelConfig.from_dict(TINY_LM_64 | {"ffn": ffn}))
    else:
        model = _model(**ffn)
    with pytest.raises(ValueError, match=message):
        prune_experts(model, keep, {})


def test_prune_command_writes_a_run_that_evaluates_and_trains(
    tmp_path: Path, data_dir: Path, capsys
) -> None:
    ffn = {"kind": "moe", "router": "topk", "num_experts": 4, "top_k": 1, "d_hidden": 32}
    cfg = tiny_config(data_dir, ffn=ffn, train={"steps": 2})
    train(cfg, tmp_path / "src")
    out = tmp_path / "pruned"
    assert main(["prune", str(tmp_path / "src"), str(out), "--keep", "2", "--batches", "2"]) == 0
    printed = capsys.readouterr().out
    assert "block 0: kept 2 of 4 experts" in printed and f"moelab train --resume {out}" in printed
    origin = RunDir(out).provenance()[0]["origin"]
    assert origin["command"] == "prune" and origin["source"] == str((tmp_path / "src").resolve())
    assert origin["checkpoint"] == "step_00000002" and origin["keep"] == 2
    assert sorted(origin["kept_experts"]) == ["0", "1"]
    model, config = load_run(out)
    assert config.model.ffn.num_experts == 2 and model.blocks[0].ffn.num_experts == 2
    assert main(["eval", str(out)]) == 0
    assert main(["train", "--resume", str(out), "train.steps=2", "logging.progress=false"]) == 0
    assert main(["prune", str(tmp_path / "src"), str(tmp_path / "x"), "--keep", "5"]) == 2
    assert "keep: must be an integer" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()  # refused before anything was written


def test_a_pruned_remoe_run_continues_with_the_trained_lambda(tmp_path: Path, data_dir: Path):
    from moelab.checkpoint_io import load_state

    ffn = {"kind": "moe", "router": "relu", "num_experts": 4, "top_k": 1, "d_hidden": 32}
    train(tiny_config(data_dir, ffn=ffn, train={"steps": 3}), tmp_path / "src")
    out = tmp_path / "pruned"
    assert main(["prune", str(tmp_path / "src"), str(out), "--keep", "2", "--batches", "1"]) == 0

    def controller(run: Path) -> dict:
        return load_state(RunDir(run).latest_checkpoint() / RunDir.STATE)["controller"]

    source, pruned = controller(tmp_path / "src"), controller(out)
    assert pruned["lam"] == source["lam"] != pruned["lambda0"]  # trained λ, not λ0
    assert pruned["target"] == 0.5  # 1 - k/E' for the 2 kept experts (the source's was 0.75)
