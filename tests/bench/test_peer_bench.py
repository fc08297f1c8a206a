"""``moelab bench peer``'s same-process comparisons: grid vs staircase candidates, tiny presets."""

from __future__ import annotations

import torch

from moelab.bench import peer as bench_peer
from moelab.bench.peer_retrieval import (
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


def test_bench_configs_ask_for_the_comparison_unless_disabled() -> None:
    import argparse

    parser = argparse.ArgumentParser()
    bench_peer.add_arguments(parser)
    cfgs = bench_peer._configs(parser.parse_args(["--quick"]))
    assert all(c["compare"] for c in cfgs)
    cfgs = bench_peer._configs(parser.parse_args(["--quick", "--no-compare"]))
    assert not any(c["compare"] for c in cfgs)
