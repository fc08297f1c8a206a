"""The PEER layer step with an older half top-k scan and plain segment sums against this code's,
alternating step by step in one process (so drift of the machine's memory bandwidth, which moves
fresh-process timings by 10-30% on a shared VM, hits both alike).

The old scan is loaded from the ``topk_avx2.py`` of another checkout (``--old-src``, e.g. a
``git archive <commit> src | tar -x -C /tmp/old`` extraction); the old segment sums are this
code's plain kernel (``sparse_rows._STREAM_STORES = False``, the same bits as before).

    PYTHONPATH=src .venv/bin/python scripts/ab_peer_kernels.py --old-src /tmp/old/src \
        --experts 1048576 --table-optimizer rowwise --rounds 10
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import torch

import moelab.layers.product_key_kernels as pkk
import moelab.layers.sparse_rows as sparse_rows
from moelab.bench.peer import make_state_resident, timed_step
from moelab.layers.peer import PEER
from moelab.native import load_c_kernel
from moelab.runtime import keep_freed_memory
from moelab.train.optim import build_optimizer


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--old-src", type=Path, required=True, help="src/ of the older checkout")
    ap.add_argument("--experts", type=int, default=1024**2)
    ap.add_argument("--table-optimizer", default="rowwise")
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    text = (args.old_src / "moelab/layers/topk_avx2.py").read_text()
    old_lib = load_c_kernel("topk_net_ab_old", text.split('TOPK_AVX2_C = r"""')[1].split('"""')[0])
    libs = {"old": old_lib, "new": pkk.avx2_topk_lib()}

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    layer = PEER(512, num_experts=args.experts, heads=8, top_k=16)
    opt = build_optimizer(layer, lr=1e-3, weight_decay=0.1, table_optimizer=args.table_optimizer)
    x = torch.randn(args.tokens, 512)

    def use(variant: str) -> None:
        sparse_rows._STREAM_STORES = variant == "new"
        pkk.avx2_topk_lib = lambda: libs[variant]

    def step() -> tuple[float, float, float]:
        return tuple(t * 1e3 for t in timed_step(layer, opt, x))  # ms

    for variant in ("old", "new"):  # warm-up: kernels, optimizer state, then made resident
        use(variant)
        step()
    make_state_resident(opt)
    keep_freed_memory()
    times: dict[str, list[tuple[float, float, float]]] = {"old": [], "new": []}
    for r in range(args.rounds):
        for variant in ("old", "new") if r % 2 == 0 else ("new", "old"):
            use(variant)
            times[variant].append(step())
    for variant, ts in times.items():
        total = [sum(t) for t in ts]
        f, b, o = (statistics.median(t[i] for t in ts) for i in range(3))
        med = statistics.median(total)
        print(
            f"{variant}: step {med:.1f} ms ({min(total):.1f}-{max(total):.1f}), fwd {f:.1f} "
            f"bwd {b:.1f} opt {o:.1f}, {args.tokens / med * 1000:.0f} tok/s"
        )
    ratios = [sum(o) / sum(n) for o, n in zip(times["old"], times["new"], strict=True)]
    print(
        f"old / new step time, per round: median {statistics.median(ratios):.3f} "
        f"({min(ratios):.3f}-{max(ratios):.3f})"
    )


if __name__ == "__main__":
    main()
