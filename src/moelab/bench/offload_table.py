"""The rows and the printed table of ``moelab bench offload`` (:mod:`moelab.bench.offload`).

Rows are medians over rounds of the session counters (:meth:`OffloadSession.stats`), tokens/s
against the fully loaded model's in the same process; with ``--miss-precision``, the quality
columns (logit difference and top-1 agreement against the loaded model's decode, and with
``--run`` the NLL of held-out validation continuations).
"""

from __future__ import annotations

import argparse
import statistics
from typing import Any


def compare(ref: list, got: list) -> tuple[float, float]:
    """Max abs difference of the step logits, and the share of steps with the same top token."""
    import torch

    a, b = torch.cat(ref), torch.cat(got)
    same = (a.argmax(-1) == b.argmax(-1)).float().mean()
    return float((a - b).abs().max()), float(same)


def rows_of(times: dict, stats: dict, tokens: int, diffs: dict, nll: dict) -> list[dict[str, Any]]:
    """One row per variant (``times``' keys: ``"loaded"``, ``(budget, policy)`` or ``(budget,
    policy, precision)``); ``nll``: the same keys' continuation scores (``--run`` with
    ``--miss-precision``), else empty."""
    loaded = statistics.median(times["loaded"])
    rows = [
        {
            "budget": "loaded",
            "policy": "-",
            "tok_s": tokens / loaded,
            "ratio": 1.0,
            "tok_s_range": [tokens / max(times["loaded"]), tokens / min(times["loaded"])],
        }
    ]
    for key, ts in times.items():
        if key == "loaded":
            continue
        ss = stats[key]

        def med(field: str, ss: list = ss) -> Any:
            values = [s[field] for s in ss if s[field] is not None]
            return statistics.median(values) if values else None

        rows.append(
            {
                "budget": key[0],
                "policy": key[1],
                "tok_s": tokens / statistics.median(ts),
                "tok_s_range": [tokens / max(ts), tokens / min(ts)],
                "ratio": loaded / statistics.median(ts),
                "hit_rate": med("hit_rate"),
                "prefetch_accuracy": med("prefetch_accuracy"),
                "read_per_token_mb": med("bytes_read") / tokens / 1e6,  # the experts' bytes
                "disk_per_token_mb": med("disk_bytes") / tokens / 1e6,  # what the file gave
                "used_per_token_mb": med("bytes_used") / tokens / 1e6,
                "read_over_used": med("read_over_used"),
                "wait_share": med("load_wait_s") / statistics.median(ts),
                "peak_over_budget": max(s["peak_bytes"] / s["budget_bytes"] for s in ss),
            }
        )
        if diffs:  # --miss-precision: the counters and the quality columns on every row
            rows[-1] |= {
                "miss_precision": key[2] if len(key) == 3 else None,
                "miss_threshold": med("miss_threshold"),
                "lowprec_mb": ss[0]["lowprec_bytes"] / 1e6,
                "lowprec_hits": med("lowprec_hits"),
                "lowprec_hits_per_token": med("lowprec_hits") / tokens,
                "saved_per_token_mb": med("bytes_saved") / tokens / 1e6,
                "logit_max_abs_diff": max(d[0] for d in diffs[key]),
                "top1_agree": min(d[1] for d in diffs[key]),
            }
    for row, key in zip(rows, times, strict=True):
        if key in nll:
            row |= {"nll": nll[key]["nll"], "nll_tokens": int(nll[key]["tokens"])}
            if "lowprec_hits" in nll[key]:
                row["nll_lowprec_hits"] = int(nll[key]["lowprec_hits"])
    return rows


def print_table(rows: list[dict], args: argparse.Namespace, stats: dict, label: str) -> None:
    first = next(iter(stats.values()))[0]
    miss = args.miss_precision
    print(
        f"\n{label}, {args.tokens} decoded "
        f"tokens, median (range) of {args.repeats} rounds; tier {first['tier']}; experts "
        f"{first['expert_bytes'] / 1e6:.1f} MB"
    )
    if miss:
        low = next((s[0] for key, s in stats.items() if len(key) == 3), None)
        th = args.miss_threshold if args.miss_threshold is not None else 0.5
        copies = f"{low['lowprec_bytes'] / 1e6:.1f} MB" if low else "-"
        print(
            f"--miss-precision {miss}: threshold {th:g}, copies {copies} (inside the budget); "
            "its rows decode the loaded model's tokens teacher-forced; 'logit diff': max abs vs "
            "the loaded model's decode logits, 'top1': steps with its top token"
            + (
                f"; 'nll': nats/token of {rows[0]['nll_tokens']} true validation tokens "
                "teacher-forced (offloaded rows: the change from the loaded model's, and the "
                "misses served from copies while scoring)"
                if "nll" in rows[0]
                else " (random init: no meaningful continuation loss)"
            )
        )
    read = sum(r.get("read_per_token_mb", 0) for r in rows)
    disk = sum(r.get("disk_per_token_mb", 0) for r in rows)
    if read and disk != read:  # O_DIRECT reads aligned supersets of the experts' ranges
        print(
            f"'read' counts the experts' bytes; O_DIRECT's aligned ranges took "
            f"{100 * (disk / read - 1):.1f}% more off the device (JSON: disk_per_token_mb)"
        )
    extra = f" {'miss':>4} {'low hits':>8} {'saved MB/tok':>12} {'logit diff':>10} {'top1':>5}"
    extra += f" {'nll':>8} {'nll low':>7}" if "nll" in rows[0] else ""
    print(
        f"{'budget':>7} {'policy':>8} {'tok/s':>18} {'vs loaded':>9} {'hit':>6} {'pf acc':>6} "
        f"{'read MB/tok':>11} {'used MB/tok':>11} {'read/used':>9} {'wait':>5}"
        + (extra if miss else "")
    )
    pct = lambda v: "-" if v is None else f"{100 * v:.0f}%"  # noqa: E731
    for r in rows:
        if "refused" in r:
            print(f"{r['budget']:>6g}% {r['policy']:>8} {miss:>4}: refused: {r['refused']}")
            continue
        rng = f"{r['tok_s']:.0f} ({r['tok_s_range'][0]:.0f}-{r['tok_s_range'][1]:.0f})"
        if r["budget"] == "loaded":
            nll = f"{'':>98} {r['nll']:>8.4f}" if "nll" in r else ""
            print(f"{'loaded':>7} {'-':>8} {rng:>18} {1.0:>9.2f}" + nll)
            continue
        line = (
            f"{r['budget']:>6g}% {r['policy']:>8} {rng:>18} {r['ratio']:>9.2f} "
            f"{pct(r['hit_rate']):>6} {pct(r['prefetch_accuracy']):>6} "
            f"{r['read_per_token_mb']:>11.2f} {r['used_per_token_mb']:>11.2f} "
            f"{r['read_over_used']:>9.2f} {pct(r['wait_share']):>5}"
        )
        if miss:
            line += (
                f" {r['miss_precision'] or '-':>4} {r['lowprec_hits']:>8g} "
                f"{r['saved_per_token_mb']:>12.2f} {r['logit_max_abs_diff']:>10.2e} "
                f"{pct(r['top1_agree']):>5}"
            )
            if "nll" in r:
                line += f" {r['nll'] - rows[0]['nll']:>+8.1e} {r['nll_lowprec_hits']:>7}"
        print(line)
