"""``moelab bench moe`` on tiny shapes: every row present, and the matmul-only ratio measured for
the ``fused`` backend (the column that says what the expert matmuls alone allow)."""

from __future__ import annotations

import argparse
import math

from moelab.bench import moe as bench


def test_rows_carry_ratio_route_share_and_gemm_ratio():
    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    args = parser.parse_args(
        [
            "--tokens",
            "64",
            "--d-model",
            "16",
            "--d-hidden",
            "64",
            "--repeats",
            "1",
            "--configs",
            "coarse",
            "fine-grained",
            "--backend",
            "fused",
        ]
    )
    rows = bench.measure(args)
    assert [(r["config"], r["layer"]) for r in rows] == [
        (c, layer)
        for c in ("coarse", "fine-grained")
        for layer in ("dense FFN", "topk MoE", "relu MoE")
    ]
    for r in rows:
        assert r["ms"] > 0 and r["ratio_vs_dense"] > 0
        assert math.isfinite(r["gemm_ratio"]) and r["gemm_ratio"] > 0
    table = bench.format_table(rows)
    assert "gemm_ratio" in table.splitlines()[0]
