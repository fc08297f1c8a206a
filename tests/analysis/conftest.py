"""Fixtures of the analysis tests (helpers live in analysis_fixtures.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
from analysis_fixtures import write_run


@pytest.fixture
def fake_runs(tmp_path: Path) -> dict[str, Path]:
    """Four hand-written runs: a dense one (no routed layers), two TopK seeds and a ReMoE run."""
    root = tmp_path / "runs"
    relu_cfg = {"model": {"ffn": {"kind": "moe", "router": "relu", "num_experts": 8, "top_k": 1}}}
    return {
        "dense": write_run(root, "dense-seed0", "dense", layers=0, val_loss=3.3),
        "topk0": write_run(root, "topk-seed0", "topk", val_loss=3.1),
        "topk1": write_run(root, "topk-seed1", "topk", val_loss=3.2),
        "remoe": write_run(
            root, "remoe-seed0", "remoe", sparsity=True, val_loss=3.0, config=relu_cfg
        ),
    }
