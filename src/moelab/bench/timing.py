"""The timing pieces of ``moelab bench moe``: interleaved medians, gradients cleared as the trainer
clears them, and the six matmuls of an FFN step (what the expert matmuls alone allow)."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch

from moelab.layers.grouped_gemm import rows_matmul, rows_outer


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_interleaved(fns: dict[str, Callable[[], None]], repeats: int, device) -> dict[str, float]:
    """Median ms of each function, timed round-robin (one call of each per round) so that drift in
    the machine's speed (other load, allocator warm-up, clocks) hits every layer alike."""
    for fn in fns.values():  # warm-up (allocator, kernels)
        fn()
        fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            _sync(device)
            t0 = time.perf_counter()
            fn()
            _sync(device)
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(t) * 1000.0 for name, t in times.items()}


def clear_grads(module: torch.nn.Module, x: torch.Tensor) -> None:
    """Gradients set to None before each step, as the trainer's ``zero_grad(set_to_none=True)``:
    backward then writes fresh gradients instead of adding into the previous step's."""
    module.zero_grad(set_to_none=True)
    x.grad = None


def six_matmuls(
    x_ND: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, counts: list[int] | None = None
) -> Callable[[], None]:
    """The six matmuls of an FFN's forward+backward (up and down projections; the down and up
    projections' weight and input gradients), on the rows ``x_ND``: grouped by expert over
    ``counts`` as the ``fused`` backend runs them, or plain ``mm`` for the dense FFN
    (``counts=None``, 2-D weights). Timing both shows what the matmuls alone allow."""
    N, D = x_ND.shape
    F2, Fh = w13.shape[-1], w2.shape[-2]
    h, a, gy = (torch.randn(N, n, device=x_ND.device, dtype=x_ND.dtype) for n in (F2, Fh, D))

    def grouped() -> None:
        rows_matmul(x_ND, w13, counts, h.new_empty(N, F2))
        rows_matmul(a, w2, counts, h.new_empty(N, D))
        rows_outer(a, gy, counts, torch.empty_like(w2))
        rows_matmul(gy, w2, counts, h.new_empty(N, Fh), transpose_w=True)
        rows_outer(x_ND, h, counts, torch.empty_like(w13))
        rows_matmul(h, w13, counts, h.new_empty(N, D), transpose_w=True)

    def dense() -> None:
        for left, right in ((x_ND, w13), (a, w2), (a.T, gy), (gy, w2.T), (x_ND.T, h), (h, w13.T)):
            torch.mm(left, right)

    return dense if counts is None else grouped
