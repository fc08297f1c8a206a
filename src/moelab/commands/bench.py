"""``moelab bench moe|peer|offload|generate``: speed/memory benchmarks that print a table (and
write JSON)."""

from __future__ import annotations

import argparse
import importlib

BENCHMARKS = {
    "moe": "moelab.bench.moe",  # dense vs TopK vs ReLU MoE, forward+backward
    "peer": "moelab.bench.peer",  # PEER / PKM at 128^2..1024^2 experts vs dense
    "offload": "moelab.bench.offload",  # expert offloading: budgets x policies vs fully loaded
    "generate": "moelab.commands._bench_generate",  # a run's generation vs transformers' generate
}


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("bench", help="run a speed/memory benchmark and print a table")
    bench_sub = parser.add_subparsers(dest="bench", metavar="BENCH", required=True)
    for name, module_name in BENCHMARKS.items():
        module = importlib.import_module(module_name)
        p = bench_sub.add_parser(name, help=(module.__doc__ or "").strip().splitlines()[0])
        p.add_argument("--json", metavar="FILE", help="also write the results as JSON")
        module.add_arguments(p)
        p.set_defaults(func=module.run)
