"""Folding several benchmark invocations into medians with ranges (no timing is asserted)."""

from __future__ import annotations

import argparse

from moelab.bench import moe as bench_moe
from moelab.bench import peer as bench_peer
from moelab.bench.invocations import aggregate_rows, spread


def _row(layer: str, ms: float, ratio: float | None) -> dict:
    return {"config": "coarse", "layer": layer, "ms": ms, "ratio_vs_dense": ratio, "note": layer}


def test_median_and_range_per_key_in_first_seen_order():
    runs = [
        [_row("dense", 10.0, 1.0), _row("moe", 12.0, 0.80)],
        [_row("dense", 11.0, 1.0), _row("moe", 11.0, 0.95)],
        [_row("dense", 30.0, 1.0), _row("moe", 13.0, 0.90)],
    ]
    rows = aggregate_rows(runs, key=("config", "layer"), fields=("ms", "ratio_vs_dense"))
    assert [r["layer"] for r in rows] == ["dense", "moe"]
    moe = rows[1]
    assert moe["ms"] == 12.0 and (moe["ms_min"], moe["ms_max"]) == (11.0, 13.0)
    assert moe["ratio_vs_dense"] == 0.90
    assert (moe["ratio_vs_dense_min"], moe["ratio_vs_dense_max"]) == (0.80, 0.95)
    assert moe["invocations"] == 3 and moe["note"] == "moe"  # untimed columns from the first run
    assert rows[0]["ms"] == 11.0  # the median ignores one slow outlier
    assert spread(moe, "ratio_vs_dense") == "0.800–0.950"


def test_even_count_median_missing_rows_and_none_values():
    runs = [
        [_row("dense", 10.0, None), _row("moe", 10.0, 0.8)],
        [_row("dense", 20.0, None)],  # this invocation lost the moe row: not invented
    ]
    rows = aggregate_rows(runs, key=("layer",), fields=("ms", "ratio_vs_dense"))
    assert rows[0]["ms"] == 15.0 and rows[0]["ratio_vs_dense"] is None
    assert rows[1]["invocations"] == 1 and spread(rows[1], "ms") == ""


def test_moe_table_shows_the_range_only_for_aggregated_rows():
    row = {
        "config": "coarse",
        "layer": "topk MoE",
        "experts": 8,
        "width": 2048,
        "top_k": 1.0,
        "ms": 100.0,
        "ratio_vs_dense": 0.9,
        "route_share": 0.01,
        "target": 0.95,
    }
    assert "range" not in bench_moe.format_table([row])
    agg = aggregate_rows([[row], [dict(row, ratio_vs_dense=0.8)]], ("layer",), ("ratio_vs_dense",))
    table = bench_moe.format_table(agg)
    assert "range" in table and "0.800–0.900" in table


def test_moe_child_payload_drops_the_parent_only_options():
    parser = argparse.ArgumentParser()
    bench_moe.add_arguments(parser)
    parser.add_argument("--json")
    args = parser.parse_args(["--invocations", "3", "--json", "x.json", "--repeats", "2"])
    payload = bench_moe._child_payload(args)
    assert "invocations" not in payload and "json" not in payload and payload["repeats"] == 2


def test_peer_table_with_aggregated_rows():
    row = {
        "layer": "peer",
        "experts": 65536,
        "params_m": 67.7,
        "ms": 250.0,
        "fwd_ms": 100.0,
        "bwd_ms": 100.0,
        "opt_ms": 50.0,
        "tokens_per_s": 8192.0,
        "state_gb": 0.8,
        "peak_gb": 0.2,
        "rows": 57000,
        "ratio_vs_256": 1.0,
    }
    agg = aggregate_rows(
        [[row], [dict(row, tokens_per_s=7000.0)]], ("layer", "experts"), bench_peer.TIMED_FIELDS
    )
    assert "7000–8192" in bench_peer.format_table(agg)
