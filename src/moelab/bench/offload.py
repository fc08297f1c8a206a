"""expert offloading: decode tokens/s, hit rate and bytes read at several budgets, vs fully loaded

The model is the ``topk-tiny`` preset with ``--experts`` experts per layer (default 64), random
init (routing untrained: no locality learnt), written once to a temporary safetensors file. For
each budget (a share of all experts' bytes) and policy (``lru``, ``lfu``, ``prefetch`` = LRU plus
next-router prefetch) a fresh model is offloaded, the prompt is prefilled, the counters are reset
and ``--tokens`` tokens are decoded greedily; the fully loaded model decodes the same tokens in
the same process, its runs interleaved with the others so that machine load hits all alike.
Median and range over ``--repeats`` rounds.
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


def _decode(model: Any, prompt: Any, tokens: int, session: Any = None) -> tuple[float, list]:
    """Seconds to decode ``tokens`` greedy tokens after a prefill (not timed), and the tokens."""
    import torch

    with torch.no_grad():
        cache = model.new_kv_cache(1, prompt.shape[1] + tokens)
        nxt = model(prompt, kv_cache=cache)[:, -1].argmax(-1, keepdim=True)
        if session is not None:
            session.reset_counters()
        out = []
        t0 = time.perf_counter()
        for _ in range(tokens):
            out.append(int(nxt))
            nxt = model(nxt, kv_cache=cache)[:, -1].argmax(-1, keepdim=True)
        return time.perf_counter() - t0, out


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
    torch.set_num_threads(args.threads)
    cfg = resolve_run_config("topk-tiny", overrides=[f"model.ffn.num_experts={args.experts}"])
    torch.manual_seed(0)
    model = TransformerLM(cfg.model).eval()
    prompt = torch.randint(
        0, cfg.model.vocab_size, (1, 16), generator=torch.Generator().manual_seed(0)
    )
    times: dict[Any, list[float]] = {"loaded": []}
    stats: dict[Any, list[dict]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        weights = Path(tmp) / "model.safetensors"
        save_weights(model, weights, 0)
        _decode(model, prompt, args.tokens)  # warm-up (allocator, kernels), not timed
        for r in range(args.repeats):
            seconds, want = _decode(model, prompt, args.tokens)
            times["loaded"].append(seconds)
            for b in budgets:
                for p in policies:
                    policy, prefetch = POLICIES[p]
                    served = TransformerLM(cfg.model).eval()
                    session = offload_model(
                        served,
                        weights,
                        f"{b}%",
                        policy=policy,
                        prefetch=prefetch,
                        tier_name=args.tier,
                        load_resident=True,
                    )
                    seconds, got = _decode(served, prompt, args.tokens, session)
                    if got != want:
                        raise RuntimeError(
                            f"offloaded tokens differ from the loaded model's ({b}%, {p})"
                        )
                    times.setdefault((b, p), []).append(seconds)
                    stats.setdefault((b, p), []).append(session.stats())
                    session.close()
            print(f"round {r + 1}/{args.repeats} done", flush=True)
    rows = _rows(times, stats, args.tokens)
    _print(rows, args, stats)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return 0


def _rows(times: dict, stats: dict, tokens: int) -> list[dict[str, Any]]:
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
    return rows


def _print(rows: list[dict], args: argparse.Namespace, stats: dict) -> None:
    first = next(iter(stats.values()))[0]
    print(
        f"\ntopk-tiny, {args.experts} experts/layer (random init), {args.tokens} decoded tokens, "
        f"median (range) of {args.repeats} rounds; tier {first['tier']}; experts "
        f"{first['expert_bytes'] / 1e6:.1f} MB"
    )
    print(
        f"{'budget':>7} {'policy':>8} {'tok/s':>18} {'vs loaded':>9} {'hit':>6} {'pf acc':>6} "
        f"{'read MB/tok':>11} {'used MB/tok':>11} {'read/used':>9} {'wait':>5}"
    )
    for r in rows:
        rng = f"{r['tok_s']:.0f} ({r['tok_s_range'][0]:.0f}-{r['tok_s_range'][1]:.0f})"
        if r["budget"] == "loaded":
            print(f"{'loaded':>7} {'-':>8} {rng:>18} {1.0:>9.2f}")
            continue
        pct = lambda v: "-" if v is None else f"{100 * v:.0f}%"  # noqa: E731
        print(
            f"{r['budget']:>6g}% {r['policy']:>8} {rng:>18} {r['ratio']:>9.2f} "
            f"{pct(r['hit_rate']):>6} {pct(r['prefetch_accuracy']):>6} "
            f"{r['read_per_token_mb']:>11.2f} {r['used_per_token_mb']:>11.2f} "
            f"{r['read_over_used']:>9.2f} {pct(r['wait_share']):>5}"
        )
