"""Golden loss curves: a short run of each tiny preset must reproduce the stored curve.

A change that alters training numerics (a loss, an init, an optimizer detail, the data order) makes
this fail on purpose. If the change is intended, regenerate the file and say why in the commit:

    MOELAB_UPDATE_GOLDEN="why the numbers moved" make golden

On the machine, torch build and thread count recorded in the file the curves must match exactly
(training on CPU is deterministic); elsewhere (another CPU model or torch build: other kernels,
other summation orders) within ``TOLERANCE``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from moelab import provenance
from moelab.train import resolve_run_config, train

GOLDEN = Path(__file__).parent / "golden" / "curves.json"
PRESETS = ("dense-tiny", "topk-tiny", "remoe-tiny", "peer-tiny")
STEPS = 20
OVERRIDES = [
    f"train.steps={STEPS}",
    "train.eval_every=0",
    "train.threads=1",
    "logging.log_every=1",
    "logging.progress=false",
    "checkpoint.every=0",
    "data.eval_max_batches=1",
]
TOLERANCE = 2e-3  # |Δ loss| per step, nats, between different CPUs / torch builds


def _machine() -> dict:
    return {
        "torch": torch.__version__,
        "cpu": provenance.cpu_model(),
        "threads": 1,
    }


def run_curve(
    preset: str, run_dir: Path, steps: int = STEPS, extra: list[str] | tuple = ()
) -> dict[str, list[float]]:
    overrides = [*OVERRIDES, f"train.steps={steps}", *extra]
    cfg = resolve_run_config(preset, overrides=overrides)
    train(cfg, run_dir, preset=preset)
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").open()]
    steps = [r for r in records if r["kind"] == "train"]
    curve = {"loss": [r["loss"] for r in steps]}
    if "lambda" in steps[0]:
        curve["lambda"] = [r["lambda_next"] for r in steps]
    return curve


@pytest.mark.parametrize("preset", PRESETS)
def test_golden_curve(preset: str, tmp_path: Path) -> None:
    curve = run_curve(preset, tmp_path / preset)
    reason = os.environ.get("MOELAB_UPDATE_GOLDEN")
    if reason:
        stored = json.loads(GOLDEN.read_text()) if GOLDEN.is_file() else {"curves": {}}
        stored.update({"machine": _machine(), "steps": STEPS, "why": reason})
        stored["curves"][preset] = curve
        GOLDEN.parent.mkdir(exist_ok=True)
        GOLDEN.write_text(json.dumps(stored, indent=1) + "\n")
        pytest.skip(f"golden curve of {preset} rewritten")
    stored = json.loads(GOLDEN.read_text())
    want = stored["curves"][preset]
    same_machine = stored["machine"] == _machine()
    for key, values in want.items():
        got = curve[key]
        assert len(got) == len(values)
        if same_machine:  # deterministic on CPU: any difference is a numerics change
            assert got == values, f"{preset} {key} moved on the machine that recorded it"
        elif key == "loss":  # λ follows the sign of a difference: only exact runs compare it
            worst = max(abs(a - b) for a, b in zip(got, values, strict=True))
            assert worst <= TOLERANCE, f"{preset} loss moved by {worst:.2e} > {TOLERANCE}"
