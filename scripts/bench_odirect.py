"""The disk tier's ``O_DIRECT`` reads against the buffered path they replaced (page-cache drop +
``pread``), in one process so machine load hits both alike. What docs/inference.md's "O_DIRECT
reads" numbers were measured with:

    python scripts/bench_odirect.py --run runs/topk64 --rounds 10 --tokens 64

Two parts, each alternating the two paths round by round, 1 torch thread:

- per read: ``--reads`` random experts of random layers read through ``ExpertStore.read``; the
  reading thread's CPU time (``time.thread_time``: kernel and user, not the wait for the device)
  and wall time per expert;
- per decoded token: for 25% LRU, 25% LFU and 100% LRU, a fresh offloaded model (``--tier
  disk``) decodes the validation text after a 16-token prompt (teacher-forced, as ``bench
  offload --run``), the loaded model decoding it right before each variant; tokens/s, the ratio
  to that loaded decode, the share of time waiting for loads, and the process CPU (all threads)
  per token. The buffered path is forced on an offloaded model by marking its store's
  ``O_DIRECT`` refused, as a filesystem refusing it would.
"""

from __future__ import annotations

import argparse
import random
import statistics
import time

import torch

VARIANTS = ((25, "lru"), (25, "lfu"), (100, "lru"))
MODES = ("direct", "buffered")


def per_read(store_path, layers, rounds: int, reads: int) -> dict[str, dict[str, list[float]]]:
    from moelab.serve.store import ExpertStore
    from moelab.serve.tiers import tier

    stores = {m: ExpertStore(store_path, tier("disk"), direct=m == "direct") for m in MODES}
    rng = random.Random(0)
    out: dict[str, dict[str, list[float]]] = {m: {"cpu": [], "wall": []} for m in MODES}
    for r in range(rounds):
        for m in MODES if r % 2 == 0 else MODES[::-1]:
            store = stores[m]
            keys = [(rng.randrange(len(layers)), rng.randrange(layers[0][1])) for _ in range(reads)]
            into = [torch.empty(s.shape, dtype=s.dtype) for s in store.slots(*layers[0])]
            slots = [store.slots(*spec) for spec in layers]
            c0, t0 = time.thread_time(), time.perf_counter()
            for layer, e in keys:
                store.read(slots[layer], e, into)
            out[m]["cpu"].append((time.thread_time() - c0) / reads * 1e3)
            out[m]["wall"].append((time.perf_counter() - t0) / reads * 1e3)
    for store in stores.values():
        store.close()
    return out


def decode(model, prompt, text: list[int], session=None) -> tuple[float, float]:
    """Seconds and process CPU seconds of decoding ``text`` after the prefill (not timed)."""
    from moelab.model.generate import PlainDecoder

    with torch.no_grad():
        decoder = PlainDecoder(model)
        decoder.prefill(prompt, None, prompt.shape[1] + len(text))
        if session is not None:
            session.reset_counters()
        c0, t0 = time.process_time(), time.perf_counter()
        for token in text:
            decoder.step(torch.tensor([token]))
        return time.perf_counter() - t0, time.process_time() - c0


def fmt(values: list[float], spec: str = ".2f") -> str:
    return f"{statistics.median(values):{spec}} ({min(values):{spec}}-{max(values):{spec}})"


def main() -> None:
    from moelab.bench.offload import add_arguments
    from moelab.bench.offload_models import bench_config, open_bench_model
    from moelab.serve import check_offloadable

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run", required=True)
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--reads", type=int, default=100)
    ours = p.parse_args()
    torch.set_num_threads(1)
    bench_p = argparse.ArgumentParser()
    add_arguments(bench_p)
    bench_p.add_argument("--json")
    args = bench_p.parse_args(["--run", ours.run, "--tier", "disk", "--tokens", str(ours.tokens)])
    cfg = bench_config(args)
    rows: dict = {}
    with open_bench_model(args, cfg) as bench:
        model, prompt, text = bench.model, bench.prompt, bench.text
        served, session = bench.serve(100, "lru", False, {})
        store = session.store
        layers = [  # (prefix, experts, shapes) of every MoE layer: ExpertStore.slots' arguments
            (f"blocks.{i}.ffn.experts.", model.cfg.ffn_for(i).num_experts, _shapes(moe.experts))
            for i, moe in check_offloadable(model)
        ]
        path, label = store.path, store.label()
        session.close()
        reads = per_read(path, layers, ours.rounds, ours.reads)
        decode(model, prompt, text)  # warm-up
        for r in range(ours.rounds):
            for budget, policy in VARIANTS:
                for m in MODES if r % 2 == 0 else MODES[::-1]:
                    loaded, loaded_cpu = decode(model, prompt, text)
                    rows.setdefault("loaded", []).append((len(text) / loaded, 1, 0, loaded_cpu))
                    served, session = bench.serve(budget, policy, False, {})
                    if m == "buffered":
                        session.store.direct_refused = "off (compared)"
                    seconds, cpu = decode(served, prompt, text, session)
                    wait = session.stats()["load_wait_s"]
                    session.close()
                    row = (len(text) / seconds, loaded / seconds, wait / seconds, cpu)
                    rows.setdefault((budget, policy, m), []).append(row)
            print(f"round {r + 1}/{ours.rounds} done", flush=True)
    print(f"\n{bench.label}; disk: {label}; median (range) of {ours.rounds} rounds")
    for m in MODES:
        print(f"per read ({m}): CPU {fmt(reads[m]['cpu'], '.3f')} ms, wall ", end="")
        print(f"{fmt(reads[m]['wall'], '.3f')} ms")
    print(f"{'variant':>22} {'tok/s':>14} {'vs loaded':>17} {'wait':>5} {'CPU ms/token':>17}")
    for key, vs in rows.items():
        name = key if key == "loaded" else f"{key[0]}% {key[1]} {key[2]}"
        cpu = [v[3] / len(text) * 1e3 for v in vs]
        print(
            f"{name:>22} {fmt([v[0] for v in vs], '.0f'):>14} {fmt([v[1] for v in vs]):>17} "
            f"{100 * statistics.median(v[2] for v in vs):>4.0f}% {fmt(cpu):>17}"
        )
    for budget, policy in VARIANTS:
        direct, buffered = rows[(budget, policy, "direct")], rows[(budget, policy, "buffered")]
        paired = [d[0] / b[0] for d, b in zip(direct, buffered, strict=True)]
        print(f"{budget}% {policy}: direct / buffered tok/s, paired by round: {fmt(paired)}")


def _shapes(experts) -> dict:
    return {"w13_EDF2": experts.w13_EDF2.shape, "w2_EFD": experts.w2_EFD.shape}


if __name__ == "__main__":
    main()
