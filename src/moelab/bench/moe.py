"""Forward+backward time of TopK and ReLU MoE layers against a dense FFN of equal active FLOPs.

Every configuration is measured in one process, interleaved, so ratios compare like with like:
``ratio_vs_dense = dense_time / moe_time`` (1.0 = as fast as the dense FFN; higher is better).
``route_share`` is the part of the layer's time not spent in expert compute: routing, sorting,
gathering and scattering back (the layer time minus the time of the same experts run alone on
pre-sorted rows). ``gemm_ratio`` is the dense FFN's six matmuls (forward and backward) timed
against the experts' six grouped matmuls on the layer's own sorted rows: how fast the expert
matmuls alone run per FLOP compared with one big matmul. The layer's ``ratio_vs_dense`` cannot
go much above it, whatever the routing costs (``–`` for backends other than ``fused``).
Gradients are set to None before each step, as the trainer does.

The ReLU router is calibrated so that its *achieved* number of active experts per token equals the
configuration's k (a constant input feature with a per-expert negative router weight at the
``1 − k/E`` quantile of its logits), which is what a trained ReMoE layer reaches: speed is then
compared at the same E and achieved k.

``--invocations N`` repeats the whole measurement in N fresh processes and reports each row's median
with its min–max range (:mod:`moelab.bench.invocations`): the number a user re-running the command
will see, rather than one process's luck.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch

from moelab.bench.invocations import aggregate_rows, run_child, spread
from moelab.bench.timing import clear_grads, six_matmuls, time_interleaved
from moelab.layers import RoutingContext, dispatch
from moelab.layers.dense import DenseFFN
from moelab.layers.experts import BACKENDS
from moelab.layers.moe import MoE
from moelab.layers.routers import ROUTERS, router_class
from moelab.runtime import allocator_mode, keep_freed_memory

CONFIGS = {
    # name: (d_hidden of one coarse expert... expressed as routed experts, width, top-k)
    "coarse": dict(num_experts=8, top_k=1, granularity=1),
    "fine-grained": dict(num_experts=8, top_k=1, granularity=8),
    "very-fine-grained": dict(num_experts=8, top_k=1, granularity=32),
}
TARGETS = {"coarse": 0.95, "fine-grained": 0.85, "very-fine-grained": 0.7}
# ``--configs routers``: every registered router (or ``--routers NAMES``) at the coarse shape
# (E=8, one expert's active width per token), in [B, L, D] batches of L=512 with token ids, so
# that segment (Lory) and token-id (Hash) routers run as in a model, with the router's own example
# options. A method whose example k is K > 1 uses granularity K (K·E experts of width 1/K) to keep
# the active width.
ROUTER_SEQ_LEN = 512
# Columns that vary between invocations (medians and ranges are reported for these).
TIMED_FIELDS = ("ms", "ratio_vs_dense", "route_share", "gemm_ratio")


@dataclass
class Row:
    config: str
    layer: str
    experts: int
    width: int
    top_k: float
    ms: float
    ratio_vs_dense: float
    route_share: float
    gemm_ratio: float
    target: float | None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--d-model", type=int, default=512)
    parser.add_argument("--d-hidden", type=int, default=2048, help="dense FFN width (active width)")
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats per layer")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--configs",
        nargs="+",
        choices=(*CONFIGS, "routers"),
        default=list(CONFIGS),
        metavar="NAME",
        help=f"{', '.join(CONFIGS)} (default: these three), routers (each router at the coarse "
        "shape, see --routers)",
    )
    parser.add_argument(
        "--routers",
        nargs="+",
        default=None,
        metavar="NAME",
        help="routers of --configs routers (default: every registered router)",
    )
    parser.add_argument("--backend", default="auto", choices=BACKENDS)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument(
        "--invocations",
        type=int,
        default=1,
        help="repeat in N fresh processes; report per-row medians and min-max (default 1)",
    )


def calibrate_relu_router(moe: MoE, x_TD: torch.Tensor, k: int) -> None:
    """Make ``moe``'s ReLU router activate ~k experts per token on inputs like ``x_TD``.

    ``x_TD``'s last feature is set to 1 (a constant direction, as real hidden states have) and each
    expert's router weight on it to minus the ``1 − k/E`` quantile of that expert's other logits.
    """
    with torch.no_grad():
        x_TD[:, -1] = 1.0
        w = moe.router.weight
        w[:, -1] = 0.0
        logits_TE = x_TD.float() @ w.float().T
        q_E = torch.quantile(logits_TE, 1.0 - k / moe.num_experts, dim=0)
        w[:, -1] = -q_E


def _moe_steps(name: str, router: str, args: argparse.Namespace):
    """The layer's forward+backward step, its experts-only step (same experts on pre-sorted rows:
    the rest of the layer's time is routing + permutation) and the layer itself."""
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    spec = CONFIGS[name]
    torch.manual_seed(0)
    moe = MoE(
        args.d_model,
        args.d_hidden,
        spec["num_experts"],
        spec["top_k"],
        router=router,
        granularity=spec["granularity"],
        backend=args.backend,
    ).to(device=device, dtype=dtype)
    x = torch.randn(args.tokens, args.d_model, device=device, dtype=dtype)
    if moe.sparsity_target is not None:  # a controlled router: start it at its target sparsity
        calibrate_relu_router(moe, x, spec["top_k"] * spec["granularity"])
    x.requires_grad_(True)
    moe.train()

    def step() -> None:
        clear_grads(moe, x)
        y = moe(x)
        (y.float().square().mean() + sum(moe.aux_losses.values())).backward()

    with torch.no_grad():
        decision = moe.router(x.detach(), None).decision
        perm = dispatch.permute(decision, pad_limit=moe.experts.pad_limit(x))
        x_ND = dispatch.gather(x.detach(), perm).requires_grad_(True)
        grad_ND = torch.randn_like(x_ND)

    def experts_only() -> None:
        # backward from a given output gradient: no loss pass over the [N, D] rows, which the
        # layer (whose loss is over [T, D]) does not have either
        clear_grads(moe.experts, x_ND)
        moe.experts(x_ND, perm.counts, perm.weight_N).backward(grad_ND)

    gemms = None
    if moe.experts.resolved_backend(x, perm.counts) == "fused":
        w13, w2 = moe.experts.w13_EDF2.detach(), moe.experts.w2_EFD.detach()
        gemms = six_matmuls(x_ND.detach(), w13, w2, perm.counts)
    return step, experts_only, gemms, moe


def bench_config(
    name: str,
    args: argparse.Namespace,
    dense_step: Callable[[], None],
    dense_gemms: Callable[[], None],
) -> list[Row]:
    """Dense and routed layers (the routers declaring ``bench_shapes``: TopK, ReLU) of one
    configuration, timed interleaved in one process."""
    fns: dict[str, Callable[[], None]] = {"dense": dense_step, "dense-gemms": dense_gemms}
    layers: dict[str, MoE] = {}
    # declared on the router's own class: a subclass (a test's, a plugin's) is not timed here
    for router in [name for name, cls in ROUTERS.items() if vars(cls).get("bench_shapes")]:
        step, experts_only, gemms, layers[router] = _moe_steps(name, router, args)
        fns[router], fns[f"{router}-experts"] = step, experts_only
        if gemms is not None:
            fns[f"{router}-gemms"] = gemms
    ms = time_interleaved(fns, args.repeats, torch.device(args.device))
    rows = [Row(name, "dense FFN", 1, args.d_hidden, 1, round(ms["dense"], 2), 1.0, 0.0, 1.0, None)]
    for router, moe in layers.items():
        gemm_ms = ms.get(f"{router}-gemms")
        gemm_ratio = float("nan") if gemm_ms is None else round(ms["dense-gemms"] / gemm_ms, 3)
        rows.append(
            Row(
                config=name,
                layer=f"{router} MoE",
                experts=moe.num_experts,
                width=moe.expert_hidden,
                top_k=round(moe.last_stats.active_mean, 2),
                ms=round(ms[router], 2),
                ratio_vs_dense=round(ms["dense"] / ms[router], 3),
                route_share=round(max(0.0, 1.0 - ms[f"{router}-experts"] / ms[router]), 3),
                gemm_ratio=gemm_ratio,
                target=TARGETS[name],
            )
        )
    return rows


def _router_step(router: str, args: argparse.Namespace) -> tuple[Callable[[], None], MoE]:
    """Forward+backward of a coarse-shaped MoE layer routed by ``router``, on [B, L, D] input with
    its token ids passed through a :class:`RoutingContext`, as a model would call it."""
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    torch.manual_seed(0)
    seq_len = min(ROUTER_SEQ_LEN, args.tokens)
    cls = router_class(router)
    moe = MoE(
        args.d_model,
        args.d_hidden,
        CONFIGS["coarse"]["num_experts"],
        CONFIGS["coarse"]["top_k"],
        router=router,
        granularity=cls.example_top_k,
        backend=args.backend,
        **cls.example_options(seq_len),
    ).to(device=device, dtype=dtype)
    batch = max(1, args.tokens // seq_len)
    x = torch.randn(batch, seq_len, args.d_model, device=device, dtype=dtype)
    if moe.sparsity_target is not None:
        calibrate_relu_router(moe, x.view(-1, args.d_model), CONFIGS["coarse"]["top_k"])
    x.requires_grad_(True)
    ids = torch.randint(0, 32000, (batch, seq_len), device=device)
    moe.train()

    def step() -> None:
        clear_grads(moe, x)
        y = moe(x, context=RoutingContext(token_ids=ids))
        (y.float().square().mean() + sum(moe.aux_losses.values())).backward()

    return step, moe


def bench_routers(args: argparse.Namespace, dense_step: Callable[[], None]) -> list[Row]:
    """Every router's layer at the coarse shape, timed interleaved with the dense FFN."""
    names = args.routers or list(ROUTERS)
    unknown = [n for n in names if n not in ROUTERS]
    if unknown:
        raise ValueError(f"--routers: unknown {unknown}; registered: {', '.join(ROUTERS)}")
    fns: dict[str, Callable[[], None]] = {"dense": dense_step}
    layers: dict[str, MoE] = {}
    for name in names:
        fns[name], layers[name] = _router_step(name, args)
    ms = time_interleaved(fns, args.repeats, torch.device(args.device))
    rows = [
        Row("routers", "dense FFN", 1, args.d_hidden, 1, round(ms["dense"], 2), 1.0, 0.0, 1.0, None)
    ]
    for name, moe in layers.items():
        active = moe.last_stats.active_mean * moe.expert_hidden / args.d_hidden
        rows.append(
            Row(
                config="routers",
                layer=name,
                experts=moe.num_experts,
                width=moe.expert_hidden,
                top_k=round(active, 2),  # active expert width per token, in coarse experts
                ms=round(ms[name], 2),
                ratio_vs_dense=round(ms["dense"] / ms[name], 3),
                route_share=float("nan"),  # not separated for routers with their own paths
                gemm_ratio=float("nan"),
                target=None,
            )
        )
    return rows


def measure(args: argparse.Namespace) -> list[dict[str, Any]]:
    """One invocation: every configuration's rows, measured in this process."""
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    torch.manual_seed(0)
    dense = DenseFFN(args.d_model, args.d_hidden).to(device=device, dtype=dtype)
    x = torch.randn(args.tokens, args.d_model, device=device, dtype=dtype, requires_grad=True)

    def dense_step() -> None:
        clear_grads(dense, x)
        dense(x).float().square().mean().backward()

    dense_gemms = six_matmuls(x.detach(), dense.w13_DF2.detach(), dense.w2_FD.detach())

    rows: list[Row] = []
    for name in args.configs:  # the dense baseline is re-measured next to each configuration
        if name == "routers":
            rows.extend(bench_routers(args, dense_step))
        else:
            rows.extend(bench_config(name, args, dense_step, dense_gemms))
    return [asdict(r) for r in rows]


def _child_payload(args: argparse.Namespace) -> dict[str, Any]:
    skip = ("func", "json", "invocations", "command", "bench")
    return {k: v for k, v in vars(args).items() if k not in skip}


def measure_invocations(args: argparse.Namespace) -> list[dict[str, Any]]:
    """``args.invocations`` fresh processes of :func:`measure`, folded into medians + ranges."""
    runs = []
    for i in range(args.invocations):
        print(f"invocation {i + 1}/{args.invocations} ...", file=sys.stderr, flush=True)
        runs.append(run_child("moelab.bench.moe", _child_payload(args), args.threads))
    return aggregate_rows(runs, key=("config", "layer"), fields=TIMED_FIELDS)


def format_table(rows: list[dict[str, Any]]) -> str:
    """The printed table; a ``range`` column (min–max ratio) when rows aggregate invocations."""
    ranged = any(r.get("invocations", 1) > 1 for r in rows)
    header = f"{'config':<18} {'layer':<13} {'E':>4} {'width':>6} {'k':>6} {'ms':>9} "
    header += f"{'ratio_vs_dense':>15} "
    header += f"{'range':>12} " if ranged else ""
    header += f"{'route_share':>12} {'gemm_ratio':>11} {'target':>7}"
    lines = [header, "-" * len(header)]
    for r in rows:
        target = "" if r["target"] is None or r["layer"] == "dense FFN" else f">={r['target']}"
        line = (
            f"{r['config']:<18} {r['layer']:<13} {r['experts']:>4} {r['width']:>6} "
            f"{r['top_k']:>6} {r['ms']:>9.1f} {r['ratio_vs_dense']:>15.3f} "
        )
        line += f"{spread(r, 'ratio_vs_dense'):>12} " if ranged else ""
        share, gemm = r["route_share"], r.get("gemm_ratio", float("nan"))
        share_text = "–" if share != share else f"{share:.1%}"  # NaN: not measured
        gemm_text = "–" if gemm != gemm else f"{gemm:.3f}"
        lines.append(line + f"{share_text:>12} {gemm_text:>11} {target:>7}")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    invocations = getattr(args, "invocations", 1)
    rows = measure_invocations(args) if invocations > 1 else measure(args)
    device = torch.device(args.device)
    threads = args.threads or torch.get_num_threads()
    how = f"median of {args.repeats}" + (
        f" per invocation, median (range) of {invocations} invocations" if invocations > 1 else ""
    )
    print(
        f"MoE forward+backward, d_model={args.d_model}, tokens={args.tokens}, {args.dtype} on "
        f"{device.type} ({threads} threads), {how}, allocator: {allocator_mode()}"
    )
    print(format_table(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)
    return 0


if __name__ == "__main__":  # child of --invocations: one measurement, JSON rows on the last line
    keep_freed_memory()  # as the moelab CLI does
    print(json.dumps(measure(argparse.Namespace(**json.loads(sys.argv[1])))))
