"""What a run says about itself besides its per-step training lines: eval lines and the summary.

The formats are ``docs/CONTRACTS.md`` "Runs"; analysis and reports read them back, so they are
built in one place.
"""

from __future__ import annotations

from typing import Any

import torch

from moelab.data import TokenDataset
from moelab.train.config import RunConfig

__all__ = ["build_summary", "eval_record"]


def eval_record(step: int, tokens: int, ev: dict[str, Any]) -> dict[str, Any]:
    """The metrics line of one validation pass (``moelab.eval.evaluate``'s result ``ev``)."""
    return {
        "kind": "eval",
        "step": step,
        "tokens": tokens,
        "val_loss": ev["val_loss"],
        "val_ppl": ev["val_ppl"],
        "val_loss_by_domain": ev["val_loss_by_domain"],
        "val_tokens": ev["tokens"],
    }


def build_summary(
    config: RunConfig,
    *,
    preset: str | None,
    steps: int,
    tokens: int,
    wall_time_s: float,
    tokens_per_s: float,
    final: dict[str, Any],
    last: dict[str, Any],
    sparsity_target: float | None,
    accounting: dict[str, Any],
    dataset: TokenDataset,
    device: torch.device,
) -> dict[str, Any]:
    """The completed run's summary (``final``: last eval line, ``last``: last train line).
    ``flops_total`` and ``params.measured_flops_per_token`` are the forward FLOPs the training
    steps really spent (see ``flops_total`` in the metrics lines), beside the nominal count."""
    spent = last.get("flops_total")
    measured = spent / tokens if spent is not None and tokens else None
    return {
        "method": config.method,
        "preset": preset,
        "steps": steps,
        "tokens": tokens,
        "wall_time_s": wall_time_s,
        "tokens_per_s": tokens_per_s,
        "final_train_loss": last.get("loss"),
        "final_val_loss": final["val_loss"],
        "final_val_ppl": final["val_ppl"],
        "val_loss_by_domain": final["val_loss_by_domain"],
        "val_tokens": final["val_tokens"],
        "unigram_entropy": dataset.meta.get("unigram_entropy_nats", {}),
        "final_sparsity": last.get("sparsity"),
        "sparsity_target": sparsity_target,
        "final_lambda": last.get("lambda_next"),
        "params": {
            "total_params": accounting["total_params"],
            "active_params": accounting["active_params"],
            "flops_per_token": accounting["flops_per_token"],
            "measured_flops_per_token": measured,
        },
        "flops_total": spent,
        "device": str(device),
        "dataset": str(dataset.path),
    }
