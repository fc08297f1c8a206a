"""Measured compute in analysis: logged flops_total, or derived from logged active experts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from moelab.analysis.compute import compute_matched, measured_compute
from moelab.analysis.runs import read_run
from moelab.analysis.settings import comparability_warnings
from moelab.model import ModelConfig, accounting

MODEL = {"vocab_size": 256, "d_model": 32, "n_layers": 2, "n_heads": 2, "max_seq_len": 16}
TOPK = {"kind": "moe", "router": "topk", "num_experts": 8, "top_k": 1, "d_hidden": 64}
TOKENS = 64  # per step


def write(root: Path, name: str, ffn: dict, active: list[list[float]], every: int = 10) -> Path:
    """A run of ``len(active) * every`` steps whose line i logs ``active[i]`` experts per token
    per layer (no flops_total: a run trained before it was logged)."""
    run = root / name
    run.mkdir(parents=True)
    model = {**MODEL, "ffn": ffn}
    (run / "config.yaml").write_text(yaml.safe_dump({"model": model}))
    acc = accounting(ModelConfig.from_dict(model))
    lines = []
    for i, per_layer in enumerate(active):
        step = (i + 1) * every
        layers = {str(k): {"num_tokens": TOKENS, "active_mean": a} for k, a in enumerate(per_layer)}
        lines.append({"kind": "train", "step": step, "tokens": step * TOKENS, "layers": layers})
        lines.append({"kind": "eval", "step": step, "tokens": step * TOKENS, "val_loss": 5.0 - i})
    (run / "metrics.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    steps = len(active) * every
    summary = {
        "method": ffn.get("router", "dense"),
        "steps": steps,
        "tokens": steps * TOKENS,
        "final_val_loss": 5.0 - len(active) + 1,
        "params": {"flops_per_token": acc["flops_per_token"]},
    }
    (run / "summary.json").write_text(json.dumps(summary))
    return run


def test_derived_from_active_experts_matches_a_step_loop(tmp_path: Path) -> None:
    ffn = {**TOPK, "router": "relu"}
    active = [[3.0, 1.0], [2.0, 0.5], [1.0, 0.25]]
    rec = read_run(write(tmp_path, "remoe", ffn, active))
    mc = measured_compute(rec)
    acc = accounting(ModelConfig.from_dict({**MODEL, "ffn": ffn}))
    per_expert = acc["routed_layers"][0]["assignment_flops"]
    fixed = acc["flops_per_token"] - 2 * per_expert  # two layers of k=1
    total = 0.0
    for step in range(1, 31):  # every step, held at the line logged at or after it
        line = active[(step - 1) // 10]
        total += TOKENS * (fixed + sum(line) * per_expert)
    assert mc.source == "derived"
    assert mc.cumulative[-1] == pytest.approx(total, rel=1e-12)
    assert mc.flops_per_token == pytest.approx(total / (30 * TOKENS), rel=1e-12)
    assert mc.at_steps([20])[0] == pytest.approx(mc.cumulative[2])


def test_topk_derived_is_nominal_and_dense_is_nominal(tmp_path: Path) -> None:
    topk = measured_compute(read_run(write(tmp_path, "topk", TOPK, [[1.0, 1.0]] * 3)))
    assert topk.flops_per_token == pytest.approx(topk.nominal_per_token, rel=1e-12)
    dense = read_run(write(tmp_path, "dense", {"kind": "dense", "d_hidden": 64}, [[]] * 3))
    mc = measured_compute(dense)
    assert mc.source == "nominal" and mc.flops_per_token == mc.nominal_per_token


def test_logged_flops_total_is_used_as_is(tmp_path: Path) -> None:
    run = write(tmp_path, "new", TOPK, [[1.0, 1.0]] * 2)
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    for ln in lines:
        if ln["kind"] == "train":
            ln["flops_total"] = 1e6 * ln["step"]
    (run / "metrics.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    mc = measured_compute(read_run(run))
    assert mc.source == "logged"
    assert mc.flops_per_token == pytest.approx(1e6 / TOKENS)


def test_warning_uses_measured_compute(tmp_path: Path) -> None:
    """The nominal count flagged AdaMoE-style null experts on their cap and missed top-p."""
    topk = read_run(write(tmp_path, "topk", TOPK, [[1.0, 1.0]] * 3))
    # a null-expert router with cap k=2 that ran ~1 real expert: nominal +100%, measured equal
    null_ffn = {**TOPK, "router": "null", "top_k": 2}
    null = read_run(write(tmp_path, "null", null_ffn, [[1.0, 1.02]] * 3))
    assert (
        null.summary["params"]["flops_per_token"] > 1.05 * topk.summary["params"]["flops_per_token"]
    )
    assert comparability_warnings([topk, null], {}) == []
    assert compute_matched([null], [topk])[1]
    # top-p at nominal k=1 that ran 3 experts per token: flagged
    top_p = read_run(write(tmp_path, "top_p", {**TOPK, "router": "top_p"}, [[3.0, 3.0]] * 3))
    assert top_p.summary["params"]["flops_per_token"] == topk.summary["params"]["flops_per_token"]
    warnings = comparability_warnings([topk, top_p], {})
    assert len(warnings) == 1 and "measured forward FLOPs per token differ" in warnings[0]
    assert not compute_matched([top_p], [topk])[1]


def test_equal_compute_claim_needs_matched_measured_compute() -> None:
    """paper-mini's ReMoE ran ~15% more expert FLOPs than TopK: its win is not one at equal
    compute; TopK vs dense is matched (within 5%) and keeps its verdict."""
    from moelab.analysis.claims import _beats, paper_mini_claims
    from moelab.analysis.suite_data import load_suite

    sd, why = load_suite(Path(__file__).parents[2] / "docs" / "results" / "paper-mini")
    assert sd is not None, why
    claims = {c: v for c, _, v in paper_mini_claims(sd)}
    text, verdict = claims["ReMoE beats TopK MoE at equal active compute"]
    assert "not equal compute" in text and verdict == "not shown (unequal compute)"
    assert _beats(sd, "remoe", "topk")[1] == "yes"  # what the nominal count let it claim
    text, verdict = claims["TopK MoE beats dense at equal active compute"]
    assert "equal compute" in text and verdict == _beats(sd, "topk", "dense")[1]
