"""End to end: tiny real runs from moelab.train → report / analyze / compare (reduced)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from test_analysis_report import check_html

from moelab.analysis import build_report, suites
from moelab.analysis.evalpass import EvalSettings
from moelab.cli import main

train = pytest.importorskip("moelab.train")

TINY = [
    "model.d_model=32",
    "model.n_layers=2",
    "model.n_heads=2",
    "model.n_kv_heads=1",
    "model.ffn.d_hidden=64",
    "train.steps=2",
    "data.batch_size=2",
    "data.seq_len=32",
    "data.eval_batch_size=2",
    "data.eval_max_batches=1",
    "checkpoint.every=1",
    "logging.log_every=1",
    "logging.progress=false",
    "train.eval_every=0",
]
FAST = EvalSettings(batch_size=2, max_batches=3)


def tiny_run(root: Path, name: str, preset: str, extra: tuple[str, ...] = ()) -> Path:
    cfg = train.resolve_run_config(preset=preset, overrides=[*TINY, *extra])
    train.train(cfg, root / name, preset=preset)
    return root / name


@pytest.fixture(scope="module")
def real_runs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("real_runs")
    runs = {
        "remoe": tiny_run(root, "remoe-seed0", "remoe-tiny"),
        # a different (padded) vocabulary: still a valid run, not comparable per token
        "dense": tiny_run(root, "dense-seed0", "dense-tiny", ("model.vocab_size=8256",)),
    }
    runs["remoe1"] = root / "remoe-seed1"  # a second "seed" (a copy) to exercise averaging
    shutil.copytree(runs["remoe"], runs["remoe1"])
    return runs


def test_report_on_real_run(real_runs, tmp_path):
    out = tmp_path / "rep"
    res = build_report([real_runs["remoe"], real_runs["remoe1"]], out, settings=FAST)
    md = res["markdown"].read_text()
    assert "| remoe | remoe | 2 |" in md
    names = {p.name for p in res["images"]}
    assert {
        "loss_curves.png",
        "dynamics_remoe.png",
        "load_remoe.png",
        "compute_remoe.png",
        "domains_remoe.png",
    } <= names
    checker = check_html(res["html"])
    assert len(checker.images) == len(res["images"]) >= 5
    assert all(src.startswith("data:image/png;base64,") for src in checker.images)
    r = res["results"]["remoe-seed0"]["results"]
    assert set(r) >= {"dynamics", "load", "compute", "domains", "usage", "top_tokens", "stability"}
    assert len(r["domains"]["domains"]) == 3  # windows spread over every domain of the split
    assert 0 <= r["stability"]["mean_token_flip_rate"] <= 1  # checkpoints 1 and 2
    assert r["load"]["0"]["num_experts"] == 8


def test_dense_run_gets_loss_table(real_runs, tmp_path):
    res = build_report([real_runs["dense"]], tmp_path / "d", settings=FAST)
    md = res["markdown"].read_text()
    assert "| dense | dense | 1 |" in md
    assert "no routed layers" in md
    check_html(res["html"])


def test_incompatible_vocabularies(real_runs, tmp_path):
    with pytest.raises(ValueError, match=rf"^{real_runs['dense']}: vocabulary \(size 8256"):
        build_report([real_runs["remoe"], real_runs["dense"]], tmp_path / "x", settings=FAST)
    # without the per-token pass the loss table compares them fine
    res = build_report(
        [real_runs["remoe"], real_runs["dense"]], tmp_path / "y", analyze=False, plots_enabled=False
    )
    assert "| dense | dense | 1 |" in res["markdown"].read_text()


def test_analyze_command_on_real_run(real_runs, capsys):
    args = ["analyze", str(real_runs["remoe"]), "--batch-size", "2", "--max-batches", "2"]
    assert main([*args, "--what", "load", "stability", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["results"]["load"]["1"]["kind"] == "moe-relu"
    assert main([*args, "--what", "compute", "--checkpoint", "1"]) == 0
    assert "active experts/token" in capsys.readouterr().out


@pytest.mark.slow
def test_compare_reduced_paper_mini(tmp_path):
    """paper-mini with 1 seed and 2 steps per run through the real trainer (without the FFN width
    override: PEER has no d_hidden)."""
    res = suites.run_suite(
        "paper-mini",
        tmp_path / "pm",
        seeds=[0],
        steps=2,
        extra_overrides=TINY[:4] + TINY[6:],
        report_settings=FAST,
        log=lambda s: None,
    )
    md = res["markdown"].read_text()
    for g in ("dense", "topk", "remoe", "peer"):
        assert f"| {g} | {g} | 1 |" in md
    check_html(res["html"])
