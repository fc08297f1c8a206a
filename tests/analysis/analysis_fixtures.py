"""Hand-written run directories that follow docs/CONTRACTS.md (no training code needed)."""

from __future__ import annotations

import json
import math
from pathlib import Path


def remoe_sparsity(step: int) -> float:
    """A scripted ReMoE curve: 0.5 → dense (0.02) by step 5, flat to 40, +0.015/step to 0.875 at
    step 97, then 0.875 ± 0.005. Dense stage ends at 45, settles (tolerance 0.025) at 96."""
    if step < 5:
        return 0.5 - step * 0.096
    if step <= 40:
        return 0.02
    if step < 97:
        return 0.02 + 0.015 * (step - 40)
    return 0.875 + (0.005 if step % 2 else -0.005)


def prov_record(**changes: object) -> dict:
    """A provenance record of this process (``moelab.provenance.collect``), with ``changes``."""
    from moelab import provenance

    return provenance.collect() | {"start_step": 0} | changes


def write_run(
    root: Path,
    name: str,
    method: str,
    steps: int = 200,
    *,
    sparsity: bool = False,
    layers: int = 2,
    experts: int = 8,
    val_loss: float = 3.0,
    domains: tuple[str, ...] = ("prose", "code"),
    config: dict | None = None,
    eval_every: int = 50,
    tokens_per_step: int = 1024,
    flops: int = 2_000_000,
    provenance: list[dict] | None = None,
) -> Path:
    run = root / name
    run.mkdir(parents=True)
    lines = []
    lam = 1e-8
    for step in range(1, steps + 1):
        line = {
            "kind": "train",
            "step": step,
            "tokens": step * tokens_per_step,
            "lr": 1e-3,
            "loss": 6.0 * math.exp(-step / 80) + val_loss,
            "aux": {},
            "grad_norm": 1.0,
            "tokens_per_s": 5000.0,
            "layers": {},
        }
        for li in range(layers):
            st = {
                "num_tokens": 1024.0,
                "active_mean": 1.0,
                "active_min": 1.0,
                "active_max": 1.0,
                "tokens_per_expert": [1024 - 7 * 10] + [10] * (experts - 1),
            }
            if sparsity:
                st["sparsity"] = min(1.0, max(0.0, remoe_sparsity(step) + 0.002 * li))
            line["layers"][str(li)] = st
        if sparsity:
            s = remoe_sparsity(step)
            lam = lam * (1.2 if s < 0.875 else 1 / 1.2)
            line.update(sparsity=s, **{"lambda": lam})
            line["aux"]["remoe_l1"] = 0.5 * (1 - s) + 0.01
        elif layers:
            line["aux"]["load_balance"] = 1.0 + 1.0 / step
        lines.append(line)
        if step % eval_every == 0 or (step == steps and eval_every <= steps):
            lines.append(
                {
                    "kind": "eval",
                    "step": step,
                    "tokens": step * tokens_per_step,
                    "val_loss": val_loss + 0.1 * (steps - step) / steps,
                    "val_ppl": math.exp(val_loss),
                    "val_loss_by_domain": {d: val_loss + i * 0.1 for i, d in enumerate(domains)},
                }
            )
    (run / "metrics.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    summary = {
        "method": method,
        "steps": steps,
        "tokens": steps * tokens_per_step,
        "wall_time_s": 10.0,
        "tokens_per_s": 5000.0,
        "final_val_loss": val_loss,
        "final_val_ppl": math.exp(val_loss),
        "val_loss_by_domain": {d: val_loss + i * 0.1 for i, d in enumerate(domains)},
        "params": {
            "total_params": 1_000_000 * (experts if layers else 1),
            "active_params": 1_000_000,
            "flops_per_token": flops,
        },
    }
    (run / "summary.json").write_text(json.dumps(summary))
    if provenance is not None:
        (run / "provenance.json").write_text(json.dumps(provenance))
    if config is not None:
        import yaml

        (run / "config.yaml").write_text(yaml.safe_dump(config))
    return run
