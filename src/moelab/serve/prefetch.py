"""Prediction-based prefetch: the next MoE layer's router applied to the current layer's input.

As Mixtral-offloading (Eliseev & Mazur 2023) and ProMoE do, the router of layer ``l+1`` is run on
the hidden state that enters layer ``l``'s experts: the residual stream changes little from one
block to the next, so its choice is a good guess of the experts layer ``l+1`` will ask for. The
guessed experts are loaded on a background thread while layer ``l``'s experts (and layer
``l+1``'s attention) compute; a guess only ever warms the cache, it never changes a result.

The router runs on a throwaway copy of the routing context (``context.next_layer()``), so the
state routers pass between layers (recurrent routers, MoE++'s residual logits) is untouched.
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor

import torch
from torch import Tensor

from moelab.layers.base import RoutingContext

__all__ = ["Prefetcher", "predict_experts"]


@torch.no_grad()
def predict_experts(
    router: torch.nn.Module, x_TD: Tensor, valid_T: Tensor | None, context: RoutingContext | None
) -> list[int]:
    """Experts ``router`` would give the rows ``x_TD`` (sorted ids, each once)."""
    scratch = context.next_layer() if context is not None else None
    decision = router(x_TD, valid_T, scratch).decision
    return sorted(set(decision.expert_idx_N.tolist()))


class Prefetcher:
    """Background threads that run loads handed to them, started in order (``workers`` at once:
    ``os.preadv`` releases the GIL, and real storage serves concurrent reads faster)."""

    def __init__(self, workers: int = 1) -> None:
        self.pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="moelab-read")
        self.pending: list[Future] = []

    def submit(self, fn, *args) -> Future:
        self.pending = [f for f in self.pending if not f.done()]
        self.pending.append(self.pool.submit(fn, *args))
        return self.pending[-1]

    def drain(self) -> None:
        """Wait for every submitted load (and raise the first error one hit)."""
        pending, self.pending = self.pending, []
        for f in pending:
            f.result()

    def close(self) -> None:
        self.drain()
        self.pool.shutdown(wait=True)
