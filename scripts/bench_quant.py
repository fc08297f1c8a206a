"""Quantized experts against float ones: bytes on disk (safetensors weights file), bytes of the
expert tensors in memory, and forward time of one MoE layer and of the whole model.

    PYTHONPATH=src python scripts/bench_quant.py [--repeats 5] [--group 32] [--keep-high 0]

One thread; the three models are timed round-robin in one process (median and min-max of
``--repeats`` rounds), so drift of a busy machine hits all alike. Random weights of the
topk-tiny shape with an expert width the int4 kernel's groups divide (d_hidden 384): neither
speed nor size depends on training.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from moelab.compress.quantization import quantize_model
from moelab.model import ModelConfig, TransformerLM

SHAPE = {
    "vocab_size": 8192,
    "d_model": 128,
    "n_layers": 4,
    "n_heads": 4,
    "n_kv_heads": 2,
    "max_seq_len": 128,
    "ffn": {"kind": "moe", "router": "topk", "num_experts": 8, "top_k": 1, "d_hidden": 384},
}


def file_bytes(model: TransformerLM) -> int:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "w.safetensors"
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, path)
        return path.stat().st_size


def expert_bytes(model: TransformerLM) -> int:
    return sum(
        t.numel() * t.element_size()
        for b in model.blocks
        for t in b.ffn.experts.state_dict().values()
    )


def timed(fns: dict, repeats: int) -> dict[str, list[float]]:
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append((time.perf_counter() - t0) * 1e3)
    return times


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--group", type=int, default=32)
    p.add_argument("--keep-high", type=int, default=0)
    p.add_argument("--batch", type=int, default=4)
    args = p.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    fp32 = TransformerLM(ModelConfig.from_dict(SHAPE)).eval()
    calib = [torch.randint(0, 8192, (2, 128))]
    models = {"fp32": fp32}
    for bits in (8, 4):
        models[f"int{bits}"] = quantize_model(
            fp32, bits, args.group, args.keep_high, calib, clip_search=False
        )[0].eval()
    ids = torch.randint(0, 8192, (args.batch, 128))
    x = torch.randn(args.batch, 128, 128)

    def layer(m: TransformerLM):
        return lambda: m.blocks[0].ffn(x)

    def whole(m: TransformerLM):
        return lambda: m(ids)

    with torch.no_grad():
        t_layer = timed({k: layer(m) for k, m in models.items()}, args.repeats)
        t_model = timed({k: whole(m) for k, m in models.items()}, args.repeats)
    print(
        f"group {args.group}, keep-high {args.keep_high}, {args.batch}x128 tokens, 1 thread, "
        f"median (min-max) of {args.repeats} interleaved rounds, ms"
    )
    print(f"{'':6} {'file bytes':>12} {'expert bytes':>13} {'MoE layer':>22} {'whole model':>22}")
    for name, m in models.items():
        cells = []
        for t in (t_layer[name], t_model[name]):
            cells.append(f"{statistics.median(t):7.2f} ({min(t):.2f}-{max(t):.2f})")
        print(f"{name:6} {file_bytes(m):>12,} {expert_bytes(m):>13,} {cells[0]:>22} {cells[1]:>22}")


if __name__ == "__main__":
    main()
