"""Training throughput on 1 process vs N processes (torchrun), and expert parallelism's all-to-all
share of the step time. What the README's "Distributed training" table was measured with:

    python scripts/bench_distributed.py --presets topk-tiny remoe-tiny --repeats 3 \
        --json bench_distributed.json

Each run trains ``--steps`` steps of the preset (global batch unchanged: 8 x 128 tokens for the
tiny presets), logging every step; throughput is the global tokens of steps ``--warmup``+1 .. end
divided by their wall time on rank 0 (evaluation, start-up and the final checkpoint excluded).
The all-to-all share is Σ ``all_to_all_s`` / Σ step time over the same steps (rank 0: its time in
the all-to-alls, forward and backward, waiting for the other ranks included).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

SETTINGS = {  # name: (processes, extra overrides)
    "1 process": (1, []),
    "2 ranks DDP": (2, []),
    "2 ranks DDP + EP 2": (2, ["distributed.expert_parallel=2"]),
    "4 ranks DDP": (4, []),
    "4 ranks DDP + EP 4": (4, ["distributed.expert_parallel=4"]),
}


def run_once(preset: str, nproc: int, extra: list[str], steps: int, run_dir: Path) -> list[dict]:
    overrides = [
        f"train.steps={steps}",
        "train.eval_every=0",
        "data.eval_max_batches=1",
        "logging.log_every=1",
        "logging.progress=false",
        "checkpoint.every=0",
        *extra,
    ]
    train = ["-m", "moelab", "train", "--preset", preset, *overrides, "--run-dir", str(run_dir)]
    if nproc == 1:
        cmd = [sys.executable, *train]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
        cmd += ["--nproc_per_node", str(nproc), *train]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run(cmd, env=env, check=True, capture_output=True, text=True)
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == "train"]


def measure(records: list[dict], warmup: int) -> dict[str, float]:
    timed = [r for r in records if r["step"] > warmup]
    tokens_per_step = records[1]["tokens"] - records[0]["tokens"]
    seconds = [tokens_per_step / r["tokens_per_s"] for r in timed]
    out = {"tokens_per_s": tokens_per_step * len(timed) / sum(seconds)}
    if "all_to_all_s" in timed[0]:
        out["all_to_all_share"] = sum(r["all_to_all_s"] for r in timed) / sum(seconds)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--presets", nargs="+", default=["topk-tiny"])
    p.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--json", type=Path)
    args = p.parse_args()
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for preset in args.presets:
            for name in args.settings:
                nproc, extra = SETTINGS[name]
                if "expert_parallel" in " ".join(extra) and "dense" in preset:
                    continue
                runs = []
                for i in range(args.repeats):
                    run_dir = Path(tmp) / f"{preset}-{nproc}-{len(extra)}-{i}"
                    runs.append(
                        measure(run_once(preset, nproc, extra, args.steps, run_dir), args.warmup)
                    )
                tps = [r["tokens_per_s"] for r in runs]
                row = {
                    "preset": preset,
                    "setting": name,
                    "processes": nproc,
                    "runs": runs,
                    "tokens_per_s_median": statistics.median(tps),
                    "tokens_per_s_min": min(tps),
                    "tokens_per_s_max": max(tps),
                }
                if "all_to_all_share" in runs[0]:
                    row["all_to_all_share_median"] = statistics.median(
                        r["all_to_all_share"] for r in runs
                    )
                results.append(row)
                share = row.get("all_to_all_share_median")
                print(
                    f"{preset:12s} {name:20s} {row['tokens_per_s_median']:8,.0f} tokens/s "
                    f"(min {min(tps):,.0f}, max {max(tps):,.0f})"
                    + (f"  all-to-all {100 * share:.1f}% of step time" if share else ""),
                    flush=True,
                )
    if args.json:
        args.json.write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
