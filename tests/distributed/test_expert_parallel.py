"""An expert-parallel MoE layer (experts split over the ranks, tokens exchanged with all-to-all)
gives the outputs and gradients of the same layer in one process, for TopK and ReLU routing,
including experts that receive no tokens and ranks that hold no tokens at all.

Tolerance: the exchanged rows are the one-process rows, so the only differences are float
summation orders (the gates are applied after the experts instead of inside them; each expert's
matmul runs on its rows in another order, from several ranks): 1e-6 of the gradients' scale.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from launcher import check_ok, run_ranks

CASES = [
    {"tokens": [7, 5]},
    {"tokens": [9, 0], "empty_experts": (5, 6, 7)},  # rank 1: no tokens, its experts ~empty
    {"tokens": [6, 4], "empty_experts": (4, 5, 6, 7)},  # rank 1's experts receive no row
    {"tokens": [0, 0]},  # nobody has tokens: every collective still runs
    {"tokens": [5, 8], "granularity": 2, "shared_experts": 1, "num_experts": 4},
]


def check(results: list[list[dict]], cases: list[dict]) -> None:
    for rank, per_case in enumerate(results):
        for case, diffs in zip(cases, per_case, strict=True):
            tol = 1e-6 * max(1.0, diffs["scale"])
            for key, value in diffs.items():
                if key in ("scale", "tokens_per_expert", "local_rows"):
                    continue
                assert value <= tol, f"rank {rank}, case {case}: {key} differs by {value:.3g}"
            for e in case.get("empty_experts", ()):
                assert diffs["tokens_per_expert"][e] == 0, (rank, case)


@pytest.mark.parametrize("router", ["topk", "relu"])
def test_two_rank_layer_matches_one_process(router: str, tmp_path: Path) -> None:
    cases = [{**c, "router": router} for c in CASES]
    results = check_ok(run_ranks(2, "ep_layer", {"cases": cases}, tmp=tmp_path))
    check(results, cases)
    assert results[1][1]["tokens_per_expert"] == [0] * 8  # the rank with no tokens
    assert all(r[0]["local_rows"] == 4 for r in results)  # 8 experts, 4 on each rank


@pytest.mark.slow
@pytest.mark.parametrize("router", ["topk", "relu"])
def test_four_rank_layer_matches_one_process(router: str, tmp_path: Path) -> None:
    cases = [
        {"tokens": [7, 5, 3, 6]},
        {"tokens": [9, 0, 4, 0], "empty_experts": (2, 3, 6, 7)},
        {"tokens": [0, 0, 0, 5], "granularity": 2, "num_experts": 4},
    ]
    cases = [{**c, "router": router} for c in cases]
    results = check_ok(run_ranks(4, "ep_layer", {"cases": cases}, tmp=tmp_path, timeout=300))
    check(results, cases)
