#!/usr/bin/env python3
"""Expert Choice's train/inference gap: validation loss of one Expert Choice model routed the way
it was trained (expert choice over the evaluation batch, non-causal) and the causal way generation
must use (each token's top-k experts of the same scores).

Expert Choice routes a token by comparing it with every other token of the batch, later ones
included, so it cannot run autoregressively; moelab's ``inference="topk"`` default replaces it at
evaluation/generation time by token-choice top-k. This script trains a ``topk-tiny``-sized model
with ``model.ffn.router=expert_choice`` and evaluates the same checkpoint both ways (plus expert
choice over one sequence at a time, to show how much the batch matters).

Usage::

    PYTHONPATH=src python scripts/ec_inference_gap.py --steps 300 --run runs/ec-gap
    PYTHONPATH=src python scripts/ec_inference_gap.py --run runs/ec-gap  # re-evaluate only

Extra arguments are config overrides (e.g. ``model.ffn.router_options.ec_capacity_factor=2``).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from moelab.eval import evaluate
from moelab.layers import MoE
from moelab.train import train
from moelab.train.config import resolve_run_config
from moelab.train.run import load_run
from moelab.train.setup import open_dataset


def evaluate_modes(run_dir: Path) -> list[dict[str, object]]:
    """Validation loss of the run's last checkpoint under each inference routing."""
    model, cfg = load_run(run_dir)
    torch.set_num_threads(cfg.train.threads or torch.get_num_threads())
    dataset = open_dataset(cfg)
    moes = [m for m in model.modules() if isinstance(m, MoE)]
    rows = []
    for label, mode, batch in (
        ("expert choice over the eval batch (as trained, non-causal)", "batch", None),
        ("expert choice over one sequence (non-causal)", "batch", 1),
        ("token-choice top-k on the same scores (causal, generation)", "topk", None),
    ):
        for moe in moes:
            moe.router.inference = mode
        batch_size = batch or cfg.data.eval_batch_size
        max_batches = cfg.data.eval_max_batches * (cfg.data.eval_batch_size // batch_size)
        res = evaluate(model, dataset, cfg.data.seq_len, batch_size, max_batches)
        rows.append(
            {
                "routing": label,
                "inference": mode,
                "eval_batch_size": batch_size,
                "val_loss": round(res["val_loss"], 4),
                "tokens": res["tokens"],
            }
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", type=Path, default=Path("runs/ec-gap"))
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    if not (args.run / "config.yaml").is_file():
        cfg = resolve_run_config(
            "topk-tiny",
            overrides=[
                "model.ffn.router=expert_choice",
                f"train.steps={args.steps}",
                "logging.progress=false",
                *args.overrides,
            ],
        )
        start = time.perf_counter()
        train(cfg, args.run)
        print(f"trained {args.steps} steps in {time.perf_counter() - start:.0f} s")
    rows = evaluate_modes(args.run)
    for row in rows:
        print(json.dumps(row))
    (args.run / "inference_gap.json").write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
