"""The parts of ``moelab bench peer`` that compare two ways of doing the same thing in one process.

* :func:`compare_candidates` - for a PEER/PKM layer: the second retrieval stage (candidate scoring
  + top-k) with the k² grid and with the Σ_a ⌊k/a⌋ staircase pairs
  (:func:`moelab.layers.product_keys.combine_halves`), its time and its share of a full training
  step of the layer in each mode, steps of the two modes alternating so that machine load hits
  both alike.
* :func:`tiny_models` - whole-model training steps of the ``peer-tiny`` and ``dense-tiny`` presets
  (forward, cross-entropy, backward, gradient clipping, optimizer step on one random batch of the
  preset's shape), alternating in one process: the tokens/s ratio the two presets' runs would have.

Ratios from one process are what this machine allows to compare while other work runs on it;
absolute numbers move with the load.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

MODES = ("grid", "staircase")


def _median_ms(fn: Callable[[], Any], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1000


def compare_candidates(layer: Any, x: Any, step: Callable[[], Any], steps: int) -> dict[str, Any]:
    """Grid vs staircase second stage of ``layer`` (a ProductKeyLayer) on the queries of ``x``;
    ``step()`` runs one full training step of the layer in its current ``candidates`` mode."""
    import torch

    from moelab.layers.product_keys import (
        combine_halves,
        half_topk,
        normalize_queries,
        staircase_pairs,
    )

    T, H, k = x.shape[0], layer.heads, layer.top_k
    with torch.no_grad():
        q = normalize_queries(layer.query_bn, layer.query(x), None).view(T, H, layer.d_key)
        top_v, top_i = half_topk(q, layer.sub_keys, k)
        S = layer.num_sub_keys
        stage = {m: [] for m in MODES}
        for _ in range(max(11, steps)):  # alternate: load drifts hit both modes alike
            for mode in MODES:
                stage[mode].append(_median_ms(lambda m=mode: combine_halves(top_v, top_i, S, m), 1))
    step_ms = {m: [] for m in MODES}
    for _ in range(steps):
        for mode in MODES:
            layer.candidates = mode
            step_ms[mode].append(_median_ms(step, 1))
    layer.candidates = "staircase"
    out: dict[str, Any] = {
        "layer": type(layer).__name__.lower(),
        "experts": layer.num_experts,
        "top_k": k,
        "tokens": T,
        "candidates": len(staircase_pairs(k)[0]),
        "grid_candidates": k * k,
    }
    for mode in MODES:
        st, sp = statistics.median(stage[mode]), statistics.median(step_ms[mode])
        out[f"stage_ms_{mode}"], out[f"step_ms_{mode}"], out[f"share_{mode}"] = st, sp, st / sp
    return out


def format_candidates_table(rows: list[dict[str, Any]]) -> str:
    """One line per layer size: candidates, second-stage ms and share of the step, both modes."""
    head = (
        f"{'layer':<6} {'experts':>9} {'k':>3} {'cand grid':>9} {'cand new':>8} "
        f"{'stage grid ms':>13} {'stage new ms':>12} {'share grid':>10} {'share new':>9} "
        f"{'step grid ms':>12} {'step new ms':>11}"
    )
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(
            f"{r['layer']:<6} {r['experts']:>9} {r['top_k']:>3} {r['grid_candidates']:>9} "
            f"{r['candidates']:>8} {r['stage_ms_grid']:>13.2f} {r['stage_ms_staircase']:>12.2f} "
            f"{r['share_grid']:>10.1%} {r['share_staircase']:>9.1%} "
            f"{r['step_ms_grid']:>12.1f} {r['step_ms_staircase']:>11.1f}"
        )
    return "\n".join(lines)


def tiny_models(cfg: dict[str, Any]) -> dict[str, Any]:
    """Child: alternating training steps of the two presets in this process; tokens/s of each."""
    import torch
    import torch.nn.functional as F

    from moelab.model import TransformerLM
    from moelab.runtime import keep_freed_memory
    from moelab.train.config import resolve_run_config
    from moelab.train.optim import build_optimizer, clip_grad_norm_

    keep_freed_memory()  # the allocator `moelab train` runs with
    torch.set_num_threads(cfg["threads"])
    steps: dict[str, Callable[[], None]] = {}
    tokens = 0
    for preset in cfg["presets"]:
        rc = resolve_run_config(preset, overrides=list(cfg.get("overrides", [])))
        torch.manual_seed(0)
        model = TransformerLM(rc.model)
        oc = rc.optim
        opt = build_optimizer(model, oc.lr, oc.weight_decay, table_optimizer=oc.table_optimizer)
        shape = (rc.data.batch_size, rc.data.seq_len)
        x = torch.randint(0, rc.model.vocab_size, shape)
        y = torch.randint(0, rc.model.vocab_size, shape)
        tokens = y.numel()

        def step(model=model, opt=opt, x=x, y=y, clip=oc.grad_clip) -> None:
            logits = model(x)
            F.cross_entropy(logits.float().flatten(0, 1), y.flatten()).backward()
            if clip:
                clip_grad_norm_(model.parameters(), clip)
            opt.step()
            opt.zero_grad(set_to_none=True)

        step()  # warm-up: optimizer state, kernels
        steps[preset] = step
    times: dict[str, list[float]] = {p: [] for p in steps}
    for _ in range(cfg["steps"]):
        for preset, fn in steps.items():
            times[preset].append(_median_ms(fn, 1))
    out: dict[str, Any] = {"tokens": tokens, "steps": cfg["steps"]}
    for preset, ts in times.items():
        out[preset] = {
            "ms": statistics.median(ts),
            "tokens_per_s": tokens / statistics.median(ts) * 1000,
        }
    a, b = cfg["presets"]
    out["ratio"] = out[a]["tokens_per_s"] / out[b]["tokens_per_s"]
    return out


def combine_tiny(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Several :func:`tiny_models` results (fresh processes) as one: the median of each tokens/s
    and of the ratio, with the ratio's range and the per-process ratios under ``ratios``."""
    out = dict(runs[0])
    for preset in (p for p in out if isinstance(out[p], dict)):
        out[preset] = {
            f: statistics.median(r[preset][f] for r in runs) for f in ("ms", "tokens_per_s")
        }
    ratios = [r["ratio"] for r in runs]
    out |= {"ratio": statistics.median(ratios), "ratios": ratios}
    return out


def format_tiny(res: dict[str, Any]) -> str:
    a, b = (p for p in res if isinstance(res[p], dict))
    ratios = res.get("ratios", [res["ratio"]])
    spread = f" ({min(ratios):.2f}–{max(ratios):.2f})" if len(ratios) > 1 else ""
    return (
        f"{a}: {res[a]['tokens_per_s']:.0f} tok/s, {b}: {res[b]['tokens_per_s']:.0f} tok/s "
        f"(median of {res['steps']} alternating steps in each of {len(ratios)} process(es)): "
        f"{a} / {b} = {res['ratio']:.2f}x{spread}"
    )


if __name__ == "__main__":  # child process: JSON on the last stdout line
    print(json.dumps(tiny_models(json.loads(sys.argv[1]))))
