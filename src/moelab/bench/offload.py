"""expert offloading: decode tokens/s, hit rate and bytes read at several budgets, vs fully loaded

The model is the ``topk-tiny`` preset with ``--experts`` experts per layer (default 64), random
init (routing untrained: no locality learnt), written once to a temporary safetensors file. For
each budget (a share of all experts' bytes) and policy (``lru``, ``lfu``, ``prefetch`` = LRU plus
next-router prefetch) a fresh model is offloaded, the prompt is prefilled, the counters are reset
and ``--tokens`` tokens are decoded greedily; the fully loaded model decodes the same tokens in
the same process, its runs interleaved with the others so that machine load hits all alike.
Median and range over ``--repeats`` rounds.

``--miss-precision int8|int4`` adds, at each budget and policy, a row for the same offloaded model
with HOBBIT's low-precision copies (:mod:`moelab.serve.lowprec`, ``--miss-threshold``); a budget
that cannot hold the copies is shown refused with the reason. Those rows decode the loaded
model's tokens teacher-forced (their own greedy tokens may differ), so every row's logits can be
compared with the loaded model's step by step: the max abs difference is the quality column,
since a random-init model has no meaningful continuation loss. ``--top-k`` (the preset's 1 by
default) gives a second expert per token, which the copies need (HOBBIT's rule compares a gate
with the token's top one).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

POLICIES = {"lru": ("lru", False), "lfu": ("lfu", False), "prefetch": ("lru", True)}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--experts", type=int, default=64, help="experts per MoE layer")
    parser.add_argument("--budgets", default="10,25,50,100", help="%% of the experts' bytes")
    parser.add_argument("--policies", default="lru,lfu,prefetch", help=", ".join(POLICIES))
    parser.add_argument("--tier", default="disk", help="disk (real), pcie16, nvme3 (modelled)")
    parser.add_argument("--tokens", type=int, default=32, help="decoded tokens per run")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--top-k", type=int, default=None, help="experts per token (preset: 1)")
    parser.add_argument(
        "--d-hidden", type=int, default=None, help="expert width (preset: 344; int4 needs 32 | it)"
    )
    parser.add_argument(
        "--miss-precision",
        default=None,
        metavar="int8|int4",
        help="also run each budget and policy with low-precision expert copies (HOBBIT)",
    )
    parser.add_argument(
        "--miss-threshold",
        type=float,
        default=None,
        metavar="SHARE",
        help="with --miss-precision: gate share of the top gate below which a miss runs from its "
        "copy (default 0.5)",
    )


def _decode(
    model: Any,
    prompt: Any,
    tokens: int,
    session: Any = None,
    force: list[int] | None = None,
    logits: list | None = None,
) -> tuple[float, list]:
    """Seconds to decode ``tokens`` greedy tokens after a prefill (not timed), and the tokens fed.
    ``force``: feed these tokens instead of the model's own; ``logits``: append each step's."""
    import torch

    with torch.no_grad():
        cache = model.new_kv_cache(1, prompt.shape[1] + tokens)
        nxt = model(prompt, kv_cache=cache)[:, -1].argmax(-1, keepdim=True)
        if session is not None:
            session.reset_counters()
        out = []
        t0 = time.perf_counter()
        for i in range(tokens):
            if force is not None:
                nxt = torch.tensor([[force[i]]])
            out.append(int(nxt))
            step = model(nxt, kv_cache=cache)[:, -1]
            if logits is not None:
                logits.append(step)
            nxt = step.argmax(-1, keepdim=True)
        return time.perf_counter() - t0, out


def _check(args: argparse.Namespace, cfg: Any) -> None:
    """The low-precision options, one line each, before any model is built."""
    from moelab.serve.lowprec import check_miss_options, miss_group

    if args.miss_threshold is not None and args.miss_precision is None:
        raise ValueError("--miss-threshold: needs --miss-precision (int8 or int4)")
    if args.miss_precision is None:
        return
    threshold = 0.5 if args.miss_threshold is None else args.miss_threshold
    check_miss_options(args.miss_precision, threshold)
    miss_group(args.miss_precision, cfg.model.d_model, cfg.model.ffn.d_hidden)


def run(args: argparse.Namespace) -> int:
    import torch

    from moelab.checkpoint_io import save_weights
    from moelab.model import TransformerLM
    from moelab.serve import offload_model
    from moelab.train.config import resolve_run_config

    budgets = [float(b) for b in args.budgets.split(",")]
    policies = args.policies.split(",")
    for p in policies:
        if p not in POLICIES:
            raise ValueError(f"--policies: each must be one of {', '.join(POLICIES)}, got {p!r}")
    overrides = [f"model.ffn.num_experts={args.experts}"]
    if args.top_k is not None:
        if not 1 <= args.top_k <= args.experts:
            raise ValueError(f"--top-k: must be in [1, --experts={args.experts}], got {args.top_k}")
        overrides.append(f"model.ffn.top_k={args.top_k}")
    if args.d_hidden is not None:
        overrides.append(f"model.ffn.d_hidden={args.d_hidden}")
    cfg = resolve_run_config("topk-tiny", overrides=overrides)
    _check(args, cfg)
    miss = args.miss_precision
    miss_kw = {} if args.miss_threshold is None else {"miss_threshold": args.miss_threshold}
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = TransformerLM(cfg.model).eval()
    prompt = torch.randint(
        0, cfg.model.vocab_size, (1, 16), generator=torch.Generator().manual_seed(0)
    )
    times: dict[Any, list[float]] = {"loaded": []}
    stats: dict[Any, list[dict]] = {}
    diffs: dict[Any, list[tuple[float, float]]] = {}  # (max abs logit diff, top-1 agreement)
    refused: dict[float, str] = {}
    with tempfile.TemporaryDirectory() as tmp:
        weights = Path(tmp) / "model.safetensors"
        save_weights(model, weights, 0)
        _decode(model, prompt, args.tokens)  # warm-up (allocator, kernels), not timed
        for r in range(args.repeats):
            ref: list | None = [] if miss else None
            seconds, want = _decode(model, prompt, args.tokens, logits=ref)
            times["loaded"].append(seconds)
            for b in budgets:
                for p in policies:
                    policy, prefetch = POLICIES[p]
                    for low in (None, miss) if miss else (None,):
                        if low is not None and b in refused:
                            continue
                        served = TransformerLM(cfg.model).eval()
                        try:
                            session = offload_model(
                                served,
                                weights,
                                f"{b}%",
                                policy=policy,
                                prefetch=prefetch,
                                tier_name=args.tier,
                                load_resident=True,
                                **({} if low is None else {"miss_precision": low} | miss_kw),
                            )
                        except ValueError as err:
                            if low is None:
                                raise
                            refused[b] = str(err)
                            continue
                        key = (b, p) if low is None else (b, p, low)
                        got_logits: list | None = [] if miss else None
                        seconds, got = _decode(
                            served,
                            prompt,
                            args.tokens,
                            session,
                            force=want if low else None,
                            logits=got_logits,
                        )
                        if low is None and got != want:
                            raise RuntimeError(
                                f"offloaded tokens differ from the loaded model's ({b}%, {p})"
                            )
                        times.setdefault(key, []).append(seconds)
                        stats.setdefault(key, []).append(session.stats())
                        if ref is not None and got_logits is not None:
                            diffs.setdefault(key, []).append(_compare(ref, got_logits))
                        session.close()
            print(f"round {r + 1}/{args.repeats} done", flush=True)
    rows = _rows(times, stats, args.tokens, diffs)
    rows += [
        {"budget": b, "policy": p, "miss_precision": miss, "refused": refused[b]}
        for b in budgets
        if b in refused
        for p in policies
    ]
    _print(rows, args, stats)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return 0


def _compare(ref: list, got: list) -> tuple[float, float]:
    """Max abs difference of the step logits, and the share of steps with the same top token."""
    import torch

    a, b = torch.cat(ref), torch.cat(got)
    same = (a.argmax(-1) == b.argmax(-1)).float().mean()
    return float((a - b).abs().max()), float(same)


def _rows(times: dict, stats: dict, tokens: int, diffs: dict) -> list[dict[str, Any]]:
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
                "read_per_token_mb": med("bytes_read") / tokens / 1e6,
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
    return rows


def _print(rows: list[dict], args: argparse.Namespace, stats: dict) -> None:
    first = next(iter(stats.values()))[0]
    miss = args.miss_precision
    k = f", k={args.top_k}" if args.top_k is not None else ""
    print(
        f"\ntopk-tiny, {args.experts} experts/layer{k} (random init), {args.tokens} decoded "
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
            "the loaded model's decode logits, 'top1': steps with its top token (random init: no "
            "meaningful continuation loss)"
        )
    extra = f" {'miss':>4} {'low hits':>8} {'saved MB/tok':>12} {'logit diff':>10} {'top1':>5}"
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
            print(f"{'loaded':>7} {'-':>8} {rng:>18} {1.0:>9.2f}")
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
        print(line)
