"""``moelab analyze RUN_DIR --what ...``: one run's routing analyses, printed or as JSON."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

from moelab.commands.report import add_eval_arguments, eval_settings

WHAT = ("dynamics", "load", "compute", "domains", "stability", "usage", "top-tokens")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "analyze",
        help="routing analyses of one run (dynamics, load, compute, domains, stability, ...)",
        description="Routing analyses of one run. 'dynamics' reads metrics.jsonl (ReMoE's three "
        "stages, settling step, sparsity after settling vs target); the others run one "
        "evaluation pass of the trained model over validation data: 'load' (tokens per expert, "
        "nearly-dead experts), 'compute' (active experts per token, by token frequency), "
        "'domains' (expert share per domain, mean KL), 'stability' (flip rate between two "
        "checkpoints), 'usage' (PEER/PKM usage and unevenness), 'top-tokens'. A run without "
        "checkpoints but with a routing.npz (moelab compare writes one per run) gets these "
        "from that file.",
    )
    p.add_argument("run", metavar="RUN_DIR", help="run directory (moelab train)")
    p.add_argument(
        "--what",
        nargs="+",
        choices=[*WHAT, "all"],
        default=["all"],
        help="analyses to run (default all)",
    )
    p.add_argument(
        "--checkpoint",
        default=None,
        help="checkpoint to analyse: step number, step_* name or path (default latest)",
    )
    p.add_argument(
        "--compare-checkpoint",
        default=None,
        help="stability: the other checkpoint (default: the one before --checkpoint)",
    )
    p.add_argument(
        "--tolerance",
        type=float,
        default=0.03,
        help="dynamics: |sparsity - target| band of the stable stage (default 0.03)",
    )
    p.add_argument(
        "--save-routing",
        action="store_true",
        help="write the pass's routing statistics into the run (routing.npz): later analyses "
        "of the run without its checkpoints recompute their numbers from it",
    )
    p.add_argument("--json", action="store_true", help="print the full results as JSON")
    p.add_argument("--plots", default=None, metavar="DIR", help="also write PNG plots to DIR")
    add_eval_arguments(p)
    p.set_defaults(func=run)


def _f(x: Any, d: int = 4) -> str:
    return "–" if x is None or (isinstance(x, float) and not math.isfinite(x)) else f"{x:.{d}f}"


def print_summary(name: str, res: dict[str, Any], notes: list[str]) -> None:
    print(f"run {name}")
    dyn = res.get("dynamics")
    if dyn:
        print(
            f"  dynamics: {dyn['steps']} steps, final LM loss {_f(dyn['final_loss'])}, "
            f"aux {', '.join(f'{k}={_f(v)}' for k, v in dyn['final_aux'].items()) or '–'}"
        )
        st = dyn.get("stages")
        if st:
            print(
                f"  ReMoE stages: dense until step {st['dense_end']}, settled at step "
                f"{st['settle_step']} (|S - {st['target']:.4f}| <= {st['tolerance']}); "
                f"sparsity after settling {_f(st['settled_mean'])} (SD over steps "
                f"{_f(st['settled_std'])})"
            )
            for lk, v in dyn.get("layer_sparsity", {}).items():
                print(f"    layer {lk}: " + ", ".join(f"{k} {_f(x)}" for k, x in v.items()))
            if dyn.get("collapsed_layers"):
                print(
                    f"  WARNING near-collapsed layers (sparsity >= 0.98 at the end): "
                    f"{dyn['collapsed_layers']}"
                )
    if "eval_tokens" in res:
        by_dom = ", ".join(f"{k} {_f(v)}" for k, v in res["eval_loss_by_domain"].items())
        print(f"  eval pass: {res['eval_tokens']} tokens; loss by domain: {by_dom}")
    for lk, v in (res.get("load") or {}).items():
        print(
            f"  load layer {lk} ({v['kind']}, E={v['num_experts']}): nearly dead "
            f"{_f(100 * v['dead_fraction'], 1)}%, max share x E = {_f(v['imbalance'], 2)}"
        )
    for lk, v in (res.get("compute") or {}).items():
        line = (
            f"  compute layer {lk}: active experts/token {_f(v['mean'], 3)} "
            f"(min {v['min']}, max {v['max']}, none {_f(100 * v['no_expert_fraction'], 1)}%)"
        )
        bf = v.get("by_frequency")
        if bf:
            line += " by frequency rare→frequent: " + " ".join(_f(x, 2) for x in bf["bin_mean"])
        print(line)
    dom = res.get("domains")
    if dom and dom.get("layers"):
        print(
            f"  domains {dom['domains']}: mean KL(domain || all) {_f(dom['mean_kl'])} nats; "
            + ", ".join(f"layer {k} {_f(v['mean_kl'])}" for k, v in dom["layers"].items())
        )
    stab = res.get("stability")
    if stab:
        print(
            f"  stability {stab['checkpoints'][0]} -> {stab['checkpoints'][1]}: assignment "
            f"flip rate {_f(stab.get('mean_assignment_flip_rate'))} (mean over layers), token "
            f"flip rate {_f(stab['mean_token_flip_rate'])}"
        )
    for lk, v in (res.get("usage") or {}).items():
        print(
            f"  usage layer {lk} ({v['kind']}, N={v['num_experts']}): usage "
            f"{_f(100 * v['usage'], 2)}%, unevenness {_f(v['unevenness'], 3)} "
            f"(max {_f(v['max_unevenness'], 2)}), distinct/batch "
            f"{_f(v['distinct_per_batch_mean'], 1)}"
        )
    for lk, rows in (res.get("top_tokens") or {}).items():
        print(f"  top tokens, layer {lk}:")
        for e, row in enumerate(rows):
            print(f"    expert {e:3d}: " + " ".join(repr(t["text"]) for t in row[:8]))
    for n in notes:
        print(f"  note: {n}")


def run(args: argparse.Namespace) -> int:
    from moelab.analysis.report import analyze_run

    what = WHAT if "all" in args.what else tuple(args.what)
    ra = analyze_run(
        args.run,
        what,
        eval_settings(args),
        checkpoint=args.checkpoint,
        compare_checkpoint=args.compare_checkpoint,
        tolerance=args.tolerance,
        save_routing=args.save_routing,
    )
    if args.plots:
        from moelab.analysis.report_plots import plot_sections

        secs = plot_sections(
            {ra.record.name: [ra.record]}, {str(ra.record.path): ra}, Path(args.plots).expanduser()
        )
        for s in secs:
            for img in s.images:
                print(f"wrote {img}")
    if args.json:
        print(
            json.dumps(
                {"run": str(ra.record.path), "results": ra.results, "notes": ra.notes}, indent=1
            )
        )
    else:
        print_summary(str(ra.record.path), ra.results, ra.notes)
    return 0
