"""Golden loss curves: a short run of each tiny preset must reproduce the stored curve.

A change that alters training numerics (a loss, an init, an optimizer detail, the data order) makes
this fail on purpose. If the change is intended, regenerate the file and say why in the commit:

    MOELAB_UPDATE_GOLDEN="why the numbers moved" make golden

Two regimes, chosen by the machine fingerprint stored with the curves
(:func:`moelab.native.numerics_fingerprint`: CPU vendor/model/family, the instruction sets that
pick kernels such as AVX-512, ATen's kernel level, torch version, MKL and its grouped GEMM, the
compiler of moelab's C kernels; plus the thread count, fixed to 1 here):

* **Same fingerprint: exact.** Training on CPU is deterministic there, so any difference in any
  step (losses, and ReMoE's λ) is a numerics change.
* **Another fingerprint: the first ``CROSS_MACHINE[preset][0]`` losses within
  ``CROSS_MACHINE[preset][1]`` nats.** Another CPU changes the last bits of the kernels' sums;
  a routed layer turns a flipped near-tie into a different expert, and the curves separate.

How the lengths and tolerances were chosen (``tests/golden/measure_drift.py``; 20-step runs of
each preset, largest |Δ loss| over the first n steps; docs/training.md has the table):

* real cross-CPU drift: the curves recorded on an Intel Xeon against an AMD EPYC
  (family 25 model 1, AVX2 without AVX-512), same torch 2.13.0+cpu;
* ulp-level perturbations on one machine that another CPU would cause: ATen's scalar kernels
  (``ATEN_CPU_CAPABILITY=default``), one GEMM per expert instead of MKL's grouped GEMM
  (``MOELAB_NO_MKL_BATCH=1``), the eager SwiGLU / top-k / AdamW-row fallbacks instead of the C
  kernels (``MOELAB_NO_C_KERNELS=1``), every initial weight moved by 1 ulp (and 2 threads, measured
  on dense-tiny only: no change).

Largest |Δ loss| measured (nats; compared steps): Xeon vs EPYC 1e-6 (dense-tiny, 20), 1e-5
(topk-tiny, 20), 4e-6 (remoe-tiny, 20), 5.1e-4 (peer-tiny, 9; 3.5e-2 over 20); perturbations
3e-5, 1.8e-5, 2.6e-5, 4.6e-4 (2.5e-2 over 20). PEER's product-key top-k turns a last-bit
difference into another retrieved expert from about step 10, so only its first 9 steps are
compared; the other presets keep all 20. The tolerances (1e-3; 2.5e-3 for PEER) are 30 to 50
times (PEER: 5 times) the largest drift measured, while a 10% larger learning rate or a changed
router formula moves the compared steps by 2.5e-2 to 8.4e-2, over 10 times the tolerance
(``test_the_tolerance_catches_real_regressions``, slow). The stored curves come from the EPYC.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch.nn.functional as F

from moelab import native
from moelab.layers.routers import relu as relu_router
from moelab.train import resolve_run_config, train

GOLDEN = Path(__file__).parent / "golden" / "curves.json"
PRESETS = ("dense-tiny", "topk-tiny", "remoe-tiny", "peer-tiny")
STEPS = 20
THREADS = 1
OVERRIDES = [
    f"train.steps={STEPS}",
    "train.eval_every=0",
    f"train.threads={THREADS}",
    "logging.log_every=1",
    "logging.progress=false",
    "checkpoint.every=0",
    "data.eval_max_batches=1",
]
# preset: (losses compared, tolerance in nats) on a machine whose fingerprint differs
CROSS_MACHINE: dict[str, tuple[int, float]] = {
    "dense-tiny": (20, 1e-3),
    "topk-tiny": (20, 1e-3),
    "remoe-tiny": (20, 1e-3),
    "peer-tiny": (9, 2.5e-3),
}
# real changes the tolerance must catch: (preset, overrides, scale of ReMoE's ReLU gate)
REGRESSIONS = [
    ("dense-tiny", ["optim.lr=3.3e-3"], None),  # 10% more learning rate
    ("peer-tiny", ["optim.lr=3.3e-3"], None),
    ("topk-tiny", ["model.ffn.balance_coef=0.02"], None),  # twice the balance loss
    ("remoe-tiny", [], 1.1),  # the router's gate relu(x) computed as 1.1·relu(x)
]


class _ScaledRelu:
    """``torch.nn.functional`` with ``relu`` scaled: another ReLU-router formula."""

    def __init__(self, scale: float) -> None:
        self.scale = scale

    def __getattr__(self, name: str):
        return getattr(F, name)

    def relu(self, x, *args, **kwargs):
        return F.relu(x, *args, **kwargs) * self.scale


def machine() -> dict:
    """What must match for the stored curves to be reproduced bit for bit."""
    return {**native.numerics_fingerprint(), "threads": THREADS}


def run_curve(
    preset: str, run_dir: Path, steps: int = STEPS, extra: list[str] | tuple = ()
) -> dict[str, list[float]]:
    overrides = [*OVERRIDES, f"train.steps={steps}", *extra]
    cfg = resolve_run_config(preset, overrides=overrides)
    train(cfg, run_dir, preset=preset)
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").open()]
    steps_ = [r for r in records if r["kind"] == "train"]
    curve = {"loss": [r["loss"] for r in steps_]}
    if "lambda" in steps_[0]:
        curve["lambda"] = [r["lambda_next"] for r in steps_]
    return curve


def mismatches(preset: str, got: dict, want: dict, exact: bool) -> list[str]:
    """What differs between a fresh curve and the stored one (empty: the test passes)."""
    problems = []
    for key, values in want.items():
        if len(got[key]) != len(values):
            problems.append(f"{preset} {key}: {len(got[key])} steps, stored {len(values)}")
        elif exact and got[key] != values:
            step = next(i for i, (a, b) in enumerate(zip(got[key], values, strict=True)) if a != b)
            step += 1
            problems.append(f"{preset} {key} moved at step {step} on the recording machine")
        elif not exact and key == "loss":  # λ follows the sign of a difference: exact runs only
            n, tol = CROSS_MACHINE[preset]
            worst = max(abs(a - b) for a, b in zip(got[key][:n], values[:n], strict=True))
            if worst > tol:
                problems.append(f"{preset} loss moved by {worst:.2e} > {tol} in {n} steps")
    return problems


@pytest.mark.parametrize("preset", PRESETS)
def test_golden_curve(preset: str, tmp_path: Path) -> None:
    curve = run_curve(preset, tmp_path / preset)
    reason = os.environ.get("MOELAB_UPDATE_GOLDEN")
    if reason:
        stored = json.loads(GOLDEN.read_text()) if GOLDEN.is_file() else {"curves": {}}
        if stored.get("machine") != machine():  # curves of one machine only
            stored["curves"] = {}
        stored.update({"machine": machine(), "steps": STEPS, "why": reason})
        stored["curves"][preset] = curve
        GOLDEN.parent.mkdir(exist_ok=True)
        GOLDEN.write_text(json.dumps(stored, indent=1) + "\n")
        pytest.skip(f"golden curve of {preset} rewritten")
    stored = json.loads(GOLDEN.read_text())
    exact = stored["machine"] == machine()
    assert not mismatches(preset, curve, stored["curves"][preset], exact)


@pytest.mark.slow
@pytest.mark.parametrize(("preset", "overrides", "relu_scale"), REGRESSIONS)
def test_the_tolerance_catches_real_regressions(
    preset: str, overrides: list[str], relu_scale: float | None, tmp_path, monkeypatch
) -> None:
    """Off the recording machine only the tolerance guards the numerics: a real change (10% more
    learning rate, another router formula) must still fail it, by a margin."""
    if relu_scale is not None:
        monkeypatch.setattr(relu_router, "F", _ScaledRelu(relu_scale))
    n, tol = CROSS_MACHINE[preset]
    stored = json.loads(GOLDEN.read_text())["curves"][preset]
    curve = run_curve(preset, tmp_path / "run", extra=overrides)
    worst = max(abs(a - b) for a, b in zip(curve["loss"][:n], stored["loss"][:n], strict=True))
    assert worst > 2 * tol, f"{overrides or relu_scale} moved {preset} by only {worst:.2e}"
    assert mismatches(preset, curve, stored, exact=False)
