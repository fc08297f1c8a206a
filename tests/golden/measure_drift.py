"""Measure how far the golden curves move under the ulp-level changes another CPU makes.

Not a test: the numbers behind the golden test's per-preset length and tolerance
(``tests/test_golden_curves.py``, ``docs/training.md``). Each variant trains every tiny preset in
a fresh process (the switches below are read once per process) and prints, per preset and
variant, the largest |Δ loss| against this machine's plain run at every prefix length::

    python tests/golden/measure_drift.py --steps 30 --out /tmp/drift.json

Variants: what another x86-64 CPU changes without any code change -- the vectorised ATen kernels
(``ATEN_CPU_CAPABILITY``), MKL's grouped GEMM vs one GEMM per expert, moelab's C kernels (built
with ``-march=native``) vs their eager fallbacks, the thread count, and a 1-ulp change of every
initial weight (what a different ``exp``/``log`` or summation order leaves after the first
operation). ``regress-*`` variants are real changes the test must catch.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
VARIANTS: dict[str, tuple[dict[str, str], list[str], str]] = {
    # name: (environment, overrides, patch)
    "plain": ({}, [], ""),
    "aten-scalar": ({"ATEN_CPU_CAPABILITY": "default"}, [], ""),
    "no-mkl-batch": ({"MOELAB_NO_MKL_BATCH": "1"}, [], ""),
    "no-c-kernels": ({"MOELAB_NO_C_KERNELS": "1"}, [], ""),
    "threads-2": ({}, ["train.threads=2"], ""),
    "ulp-init": ({}, [], "ulp"),
    "regress-lr": ({}, ["optim.lr=3.3e-3"], ""),
}

_CHILD = r"""
import json, sys, torch
sys.path.insert(0, {tests!r})
from test_golden_curves import run_curve
import moelab.train.trainer as trainer
if {patch!r} == "ulp":
    class Perturbed(trainer.TransformerLM):  # every initial weight 1 ulp up or down, at random
        def __init__(self, config):
            super().__init__(config)
            gen = torch.Generator().manual_seed(1)
            with torch.no_grad():
                for p in self.parameters():
                    up = torch.rand(p.shape, generator=gen) < 0.5
                    p.copy_(torch.where(up, torch.nextafter(p, p + 1), torch.nextafter(p, p - 1)))
    trainer.TransformerLM = Perturbed
curve = run_curve({preset!r}, __import__("pathlib").Path({run_dir!r}), steps={steps},
                  extra={extra!r})
print("CURVE" + json.dumps(curve))
"""


def run_variant(preset: str, variant: str, steps: int) -> dict[str, list[float]]:
    env_extra, extra, patch = VARIANTS[variant]
    with tempfile.TemporaryDirectory() as tmp:
        code = _CHILD.format(
            tests=str(HERE.parent),
            patch=patch,
            preset=preset,
            run_dir=str(Path(tmp) / "run"),
            steps=steps,
            extra=extra,
        )
        out = subprocess.run(
            [sys.executable, "-c", code],
            env={**os.environ, **env_extra},
            capture_output=True,
            text=True,
        )
        if out.returncode:
            raise RuntimeError(f"{preset} {variant} failed:\n{out.stderr[-3000:]}")
        out = out.stdout
    line = next(x for x in out.splitlines() if x.startswith("CURVE"))
    return json.loads(line[len("CURVE") :])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--presets", default="dense-tiny,topk-tiny,remoe-tiny,peer-tiny")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    results: dict[str, dict[str, dict]] = {}
    if args.out is not None and args.out.is_file():
        results = json.loads(args.out.read_text())
    for preset in args.presets.split(","):
        for variant in args.variants.split(","):
            if variant in results.get(preset, {}):
                continue
            curve = run_variant(preset, variant, args.steps)
            results.setdefault(preset, {})[variant] = curve
            if args.out is not None:
                args.out.write_text(json.dumps(results, indent=1))
            plain = results[preset].get("plain")
            if plain is not None:
                worst, lines = 0.0, []
                for a, b in zip(curve["loss"], plain["loss"], strict=False):
                    worst = max(worst, abs(a - b))
                    lines.append(f"{worst:.1e}")
                print(preset, variant, " ".join(lines), flush=True)


if __name__ == "__main__":
    main()
