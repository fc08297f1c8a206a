"""PEER / PKM training-step speed and memory at 128²..1024² experts vs a dense FFN.

Each configuration runs in a fresh subprocess (clean peak memory): build the layer and
:func:`moelab.train.optim.build_optimizer`, run warm-up steps (which create the AdamW state; the
state is then written once so that it is resident like in a long run), reset the kernel's peak-RSS
mark (``/proc/self/clear_refs``), and time ``--steps`` full steps of forward + backward
(``y.square().mean()``) + optimizer step on ``--tokens`` random tokens. Reported per config:

* ``ms`` median step time (and its forward / backward / optimizer parts), ``tok/s``;
* ``x256²``: step time relative to PEER at 256² experts (the "cost does not grow with N" check);
* ``state GB``: parameters + AdamW state (analytic); ``peak GB``: peak RSS during the timed steps
  above the resident RSS before them (activations, gradients, scratch);
* ``rows``: distinct expert rows touched per step (what the sparse gradient and update cost scale
  with);
* a second table: the second retrieval stage (candidate scoring + top-k) with the k² grid and with
  the staircase pairs, and its share of the layer's step in each mode, in the same process
  (:mod:`moelab.bench.peer_retrieval`; ``--no-compare`` skips it);
* a last line: ``peer-tiny`` vs ``dense-tiny`` whole-model training tokens/s, alternating steps in
  one process (``--tiny-steps 0`` skips it; ``--tiny-invocations N``: N fresh processes, median
  and range of the ratio);
* ``opt GB/s``: the bytes the lazy AdamW update must move (per touched row of each table: read the
  gradient, read and write the parameter and both moments, 7 x 4 bytes per element; 20 / 16 bytes
  with ``--table-optimizer rowwise`` / ``rowwise_bf16``, :mod:`moelab.train.rowwise`) over ``opt``;
  ``mem GB/s``: the machine's in-place read+write bandwidth measured in the same process right
  after (``mul_`` over a 256 MB buffer, best of 5). When the two are close the optimizer step is at
  the memory-bandwidth floor: only touching fewer rows or fewer bytes per row makes it faster.

The dense baselines have the same active expert FLOPs as PEER (``H·k`` hidden ReLU units) and the
usual ``4·D``. ``peak GB`` is measured on one step with the system allocator (with freed memory
kept, the warm-up steps' scratch would already be resident and it would read 0); the timed steps
then run with the allocator ``moelab train`` uses (:func:`moelab.runtime.keep_freed_memory`), so
that they do not page-fault a step's scratch in again each step as a training run does not
(``MOELAB_SYSTEM_MALLOC=1`` times the system default).

``--invocations N`` runs the whole set N times (every configuration a fresh process each time) and
reports per-row medians with the min–max of ``ms`` and ``tok/s`` (:mod:`moelab.bench.invocations`).
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from dataclasses import asdict, dataclass
from typing import Any

from moelab.bench.invocations import aggregate_rows, run_child, spread
from moelab.bench.peer_retrieval import (
    combine_tiny,
    compare_candidates,
    format_candidates_table,
    format_tiny,
)
from moelab.runtime import allocator_mode, keep_freed_memory

SIZES = (128, 256, 512, 1024)
# Columns that vary between invocations (medians and ranges are reported for these).
TIMED_FIELDS = (
    "ms",
    "fwd_ms",
    "bwd_ms",
    "opt_ms",
    "tokens_per_s",
    "peak_gb",
    "ratio_vs_256",
    "opt_gbps",
    "mem_gbps",
)
# Bytes the lazy AdamW update moves per element of a touched row: gradient read; parameter, first
# and second moment each read and written (float32).
ADAMW_BYTES_PER_ELEMENT = 7 * 4
# The same for each table optimizer (row-wise: no [N, D] second moment; bf16: a 2-byte first
# moment; moelab.train.rowwise). "dense" moves every row, not only the touched ones.
BYTES_PER_ELEMENT = {"lazy": ADAMW_BYTES_PER_ELEMENT, "dense": ADAMW_BYTES_PER_ELEMENT}
BYTES_PER_ELEMENT |= {"rowwise": 5 * 4, "rowwise_bf16": 3 * 4 + 2 * 2}


@dataclass
class Result:
    layer: str
    experts: int
    params_m: float
    ms: float
    fwd_ms: float
    bwd_ms: float
    opt_ms: float
    tokens_per_s: float
    state_gb: float
    peak_gb: float
    rows: int
    opt_gbps: float | None = None
    mem_gbps: float | None = None
    ratio_vs_256: float | None = None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quick", action="store_true", help="small smoke run (seconds)")
    parser.add_argument("--sizes", type=int, nargs="+", default=list(SIZES), help="√N values")
    parser.add_argument("--d-model", type=int, default=512)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--top-k", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per config")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-pkm", action="store_true", help="skip the PKM baseline")
    parser.add_argument("--no-dense", action="store_true", help="skip the dense baselines")
    parser.add_argument(
        "--table-optimizer",
        choices=("lazy", "dense", "rowwise", "rowwise_bf16"),
        default="lazy",
        help="PEER/PKM table update (optim.table_optimizer; default: exact lazy AdamW)",
    )
    parser.add_argument(
        "--no-compare",
        action="store_true",
        help="skip the grid vs staircase candidate comparison of each PEER/PKM size",
    )
    parser.add_argument(
        "--tiny-steps",
        type=int,
        default=5,
        help="alternating peer-tiny / dense-tiny training steps for their tokens/s ratio (0: skip)",
    )
    parser.add_argument(
        "--tiny-invocations",
        type=int,
        default=1,
        help="fresh processes for the peer-tiny / dense-tiny ratio (median and range)",
    )
    parser.add_argument(
        "--invocations",
        type=int,
        default=1,
        help="repeat every config in N fresh processes; report medians and min-max (default 1)",
    )


def _status_kb(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM to the current RSS
        return True
    except OSError:
        return False


def timed_step(layer: Any, opt: Any, x: Any) -> tuple[float, float, float]:
    """One training step of ``layer`` on ``x`` (loss ``y.square().mean()``): forward, backward
    and optimizer seconds."""
    t0 = time.perf_counter()
    y = layer(x)
    t1 = time.perf_counter()
    y.square().mean().backward()
    t2 = time.perf_counter()
    opt.step()
    opt.zero_grad(set_to_none=True)
    t3 = time.perf_counter()
    return t1 - t0, t2 - t1, t3 - t2


def make_state_resident(opt: Any) -> None:
    """Touch every page of the lazily allocated optimizer state, as a long run has."""
    import torch

    with torch.no_grad():
        for state in opt.state.values():
            for v in state.values():
                if torch.is_tensor(v) and v.is_floating_point() and v.numel() > 1:
                    v.mul_(1.0)


def _child(cfg: dict) -> dict:
    """Measure one configuration in this (fresh) process."""
    import torch
    from torch import nn

    from moelab.layers.peer import PEER
    from moelab.layers.pkm import PKM
    from moelab.train.optim import build_optimizer

    torch.set_num_threads(cfg["threads"])
    torch.manual_seed(0)
    D, T, kind = cfg["d_model"], cfg["tokens"], cfg["layer"]
    if kind == "peer":
        layer = PEER(D, num_experts=cfg["experts"], heads=cfg["heads"], top_k=cfg["top_k"])
    elif kind == "pkm":
        layer = PKM(D, num_memories=cfg["experts"], heads=cfg["heads"], top_k=cfg["top_k"])
    else:
        layer = nn.Sequential(nn.Linear(D, cfg["hidden"]), nn.ReLU(), nn.Linear(cfg["hidden"], D))
    table_optimizer = cfg.get("table_optimizer", "lazy")
    opt = build_optimizer(layer, lr=1e-3, weight_decay=0.1, table_optimizer=table_optimizer)
    x = torch.randn(T, D)
    times: list[tuple[float, float, float]] = []
    rows = 0

    def step() -> tuple[float, float, float]:
        return timed_step(layer, opt, x)

    for _ in range(2):
        step()
    make_state_resident(opt)
    rss_kb = _status_kb("VmRSS") or 0
    clean = _reset_peak()
    maxrss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    step()  # the peak of one step's scratch, every buffer freshly allocated (system allocator)
    peak_kb = _status_kb("VmHWM") if clean else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # timed with the allocator of `moelab train` (freed memory kept, so a step's scratch is not
    # page-faulted in again each step; MOELAB_SYSTEM_MALLOC=1 times the system default instead)
    keep_freed_memory()
    for _ in range(2):
        step()
    for _ in range(cfg["steps"]):
        times.append(step())
        stats = getattr(layer, "last_stats", None)
        if stats is not None and stats.distinct_experts is not None:
            rows = int(stats.distinct_experts)
    compare = None
    if kind in ("peer", "pkm") and cfg.get("compare"):
        compare = compare_candidates(layer, x, step, cfg["steps"])
    if not clean:
        rss_kb = maxrss0
    n_params = sum(p.numel() for p in layer.parameters())
    state_bytes = sum(
        v.numel() * v.element_size()
        for s in opt.state.values()
        for v in s.values()
        if torch.is_tensor(v)
    )
    opt_gbps = mem_gbps = None
    if kind in ("peer", "pkm") and rows:
        tables = 2 if kind == "peer" else 1  # PEER: u and v; PKM: the values
        moved = tables * rows * D * BYTES_PER_ELEMENT[table_optimizer]
        opt_s = sorted(t[2] for t in times)[len(times) // 2]
        opt_gbps, mem_gbps = moved / opt_s / 1e9, _inplace_bandwidth_gbps()
    totals = [sum(t) for t in times]
    med = sorted(range(len(totals)), key=lambda i: totals[i])[len(totals) // 2]
    f, b, o = times[med]
    ms = totals[med] * 1000
    name = kind if kind != "dense" else f"dense-{cfg['hidden']}"
    return {"compare": compare, "allocator": allocator_mode()} | asdict(
        Result(
            layer=name,
            experts=cfg.get("experts", 0),
            params_m=n_params / 1e6,
            ms=ms,
            fwd_ms=f * 1000,
            bwd_ms=b * 1000,
            opt_ms=o * 1000,
            tokens_per_s=T / (ms / 1000),
            state_gb=(n_params * 4 + state_bytes) / 1e9,
            peak_gb=max(0, (peak_kb or 0) - rss_kb) * 1024 / 1e9,
            rows=rows,
            opt_gbps=opt_gbps,
            mem_gbps=mem_gbps,
        )
    )


def _inplace_bandwidth_gbps(nbytes: int = 256 << 20, repeats: int = 5) -> float:
    """Read+write bandwidth of an in-place pass over a buffer far larger than the caches (GB/s):
    the access pattern of an in-place optimizer update, without its arithmetic."""
    import torch

    buf = torch.ones(nbytes // 4)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        buf.mul_(1.0)
        best = min(best, time.perf_counter() - t0)
    return 2 * nbytes / best / 1e9


def _configs(args: argparse.Namespace) -> list[dict]:
    base = dict(d_model=args.d_model, tokens=args.tokens, steps=args.steps, threads=args.threads)
    base["compare"] = not getattr(args, "no_compare", False)
    base["table_optimizer"] = getattr(args, "table_optimizer", "lazy")
    sizes = args.sizes
    if args.quick:
        base.update(d_model=128, tokens=256, steps=2)
        sizes = [16, 64]
    cfgs = [
        dict(base, layer="peer", experts=s * s, heads=args.heads, top_k=args.top_k) for s in sizes
    ]
    if not args.no_pkm:
        s = max(sizes)
        cfgs.append(dict(base, layer="pkm", experts=s * s, heads=args.heads, top_k=2 * args.top_k))
    if not args.no_dense:
        cfgs.append(dict(base, layer="dense", hidden=args.heads * args.top_k))
        cfgs.append(dict(base, layer="dense", hidden=4 * base["d_model"]))
    return cfgs


def format_table(rows: list[dict]) -> str:
    ranged = any(r.get("invocations", 1) > 1 for r in rows)
    head = (
        f"{'layer':<10} {'experts':>9} {'params M':>9} {'ms':>8} {'fwd':>7} {'bwd':>7} "
        f"{'opt':>7} {'tok/s':>8} "
    )
    head += f"{'tok/s range':>13} " if ranged else ""
    head += f"{'x256²':>6} {'state GB':>9} {'peak GB':>8} {'rows':>7} "
    head += f"{'opt GB/s':>9} {'mem GB/s':>9}"
    lines = [head, "-" * len(head)]
    for r in rows:
        ratio = "" if r.get("ratio_vs_256") is None else f"{r['ratio_vs_256']:.2f}"
        line = (
            f"{r['layer']:<10} {r['experts']:>9} {r['params_m']:>9.1f} {r['ms']:>8.1f} "
            f"{r['fwd_ms']:>7.1f} {r['bwd_ms']:>7.1f} {r['opt_ms']:>7.1f} "
            f"{r['tokens_per_s']:>8.0f} "
        )
        line += f"{spread(r, 'tokens_per_s', '.0f'):>13} " if ranged else ""
        gbps = ["" if r.get(key) is None else f"{r[key]:.1f}" for key in ("opt_gbps", "mem_gbps")]
        lines.append(
            line + f"{ratio:>6} {r['state_gb']:>9.2f} {r['peak_gb']:>8.2f} {r['rows']:>7} "
            f"{gbps[0]:>9} {gbps[1]:>9}"
        )
    return "\n".join(lines)


def _one_invocation(cfgs: list[dict], label: str) -> list[dict]:
    results = []
    for cfg in cfgs:
        print(
            f"{label}running {cfg['layer']} {cfg.get('experts', cfg.get('hidden'))} ...",
            file=sys.stderr,
            flush=True,
        )
        results.append(run_child("moelab.bench.peer", cfg, cfg["threads"]))
    ref = next((r for r in results if r["layer"] == "peer" and r["experts"] == 256**2), None)
    for r in results:
        if ref is not None and r["layer"] == "peer":
            r["ratio_vs_256"] = r["ms"] / ref["ms"]
    return results


def run(args: argparse.Namespace) -> int:
    for name in ("invocations", "tiny_invocations"):
        if getattr(args, name, 1) < 1:
            raise ValueError(f"--{name.replace('_', '-')}: must be >= 1, got {getattr(args, name)}")
    cfgs, n = _configs(args), getattr(args, "invocations", 1)
    runs = [_one_invocation(cfgs, f"[{i + 1}/{n}] " if n > 1 else "") for i in range(n)]
    results: list[dict[str, Any]] = (
        runs[0] if n == 1 else aggregate_rows(runs, ("layer", "experts"), TIMED_FIELDS)
    )
    if n > 1:
        print(f"median (range) of {n} invocations, each config a fresh process per invocation")
    print(format_table(results))
    print(f"timed steps' allocator: {results[0].get('allocator', 'system default')}")
    compared = [r["compare"] for r in runs[-1] if r.get("compare")]
    if compared:
        print(
            "\nsecond retrieval stage (candidate scoring + top-k), k² grid vs staircase pairs, "
            "steps alternating in one process (last invocation):"
        )
        print(format_candidates_table(compared))
    tiny = None
    if getattr(args, "tiny_steps", 0) > 0:
        payload = dict(presets=["peer-tiny", "dense-tiny"], steps=args.tiny_steps, threads=1)
        print("running peer-tiny vs dense-tiny ...", file=sys.stderr, flush=True)
        tiny = combine_tiny(
            [
                run_child("moelab.bench.peer_retrieval", payload, 1)
                for _ in range(getattr(args, "tiny_invocations", 1))
            ]
        )
        print("\n" + format_tiny(tiny))
    if getattr(args, "json", None):
        doc = {"config": vars(args) | {"func": None}, "results": results, "tiny_models": tiny}
        with open(args.json, "w") as f:
            json.dump(doc, f, indent=2)
    return 0


if __name__ == "__main__":  # child process: one configuration, JSON on the last stdout line
    print(json.dumps(_child(json.loads(sys.argv[1]))))
