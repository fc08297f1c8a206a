"""``moelab bench peer``'s same-process comparisons: grid vs staircase candidates, tiny presets."""

from __future__ import annotations

import pytest
import torch

from moelab.bench import peer as bench_peer
from moelab.bench.peer_retrieval import (
    combine_tiny,
    compare_candidates,
    format_candidates_table,
    format_tiny,
    tiny_models,
)
from moelab.layers.peer import PEER


def test_compare_candidates_reports_both_modes_and_restores_the_layer() -> None:
    torch.manual_seed(0)
    layer = PEER(16, num_experts=32**2, heads=2, top_k=16, d_key=8)
    x = torch.randn(20, 16)
    modes_seen = []

    def step() -> None:
        modes_seen.append(layer.candidates)
        layer(x).square().mean().backward()

    row = compare_candidates(layer, x, step, steps=2)
    assert (row["candidates"], row["grid_candidates"]) == (50, 256)  # Σ_a ⌊16/a⌋ vs 16²
    assert modes_seen == ["grid", "staircase"] * 2 and layer.candidates == "staircase"
    for mode in ("grid", "staircase"):
        assert row[f"share_{mode}"] == row[f"stage_ms_{mode}"] / row[f"step_ms_{mode}"]
    table = format_candidates_table([row])
    assert "     256       50" in table and "peer" in table


def test_tiny_models_ratio_is_the_tokens_per_second_ratio() -> None:
    small = ["model.n_layers=1", "model.vocab_size=256", "data.batch_size=1", "data.seq_len=16"]
    res = tiny_models(
        dict(presets=["peer-tiny", "dense-tiny"], steps=1, threads=1, overrides=small)
    )
    assert res["tokens"] == 16
    ratio = res["peer-tiny"]["tokens_per_s"] / res["dense-tiny"]["tokens_per_s"]
    assert res["ratio"] == ratio
    assert "peer-tiny / dense-tiny = " in format_tiny(res)


def test_tiny_runs_combine_as_medians_with_the_ratio_range() -> None:
    def one(peer: float, dense: float) -> dict:
        return {
            "tokens": 8,
            "steps": 2,
            "peer-tiny": {"ms": 8000 / peer, "tokens_per_s": peer},
            "dense-tiny": {"ms": 8000 / dense, "tokens_per_s": dense},
            "ratio": peer / dense,
        }

    res = combine_tiny([one(60, 100), one(50, 100), one(66, 110)])
    assert res["ratio"] == 0.6 and res["ratios"] == [0.6, 0.5, 0.6]  # median of 0.6, 0.5, 0.6
    assert res["peer-tiny"]["tokens_per_s"] == 60 and res["dense-tiny"]["tokens_per_s"] == 100
    line = format_tiny(res)
    assert "each of 3 process(es)" in line and "= 0.60x (0.50–0.60)" in line


def test_invocation_counts_below_one_are_refused() -> None:
    import argparse

    parser = argparse.ArgumentParser()
    bench_peer.add_arguments(parser)
    with pytest.raises(ValueError, match="--tiny-invocations: must be >= 1, got 0"):
        bench_peer.run(parser.parse_args(["--tiny-invocations", "0"]))


def test_bench_configs_ask_for_the_comparison_unless_disabled() -> None:
    import argparse

    parser = argparse.ArgumentParser()
    bench_peer.add_arguments(parser)
    cfgs = bench_peer._configs(parser.parse_args(["--quick"]))
    assert all(c["compare"] for c in cfgs)
    cfgs = bench_peer._configs(parser.parse_args(["--quick", "--no-compare"]))
    assert not any(c["compare"] for c in cfgs)
