"""Expert offloading: non-expert weights resident, experts read on demand under a byte budget.

:func:`offload_model` turns a built :class:`~moelab.model.TransformerLM` into one whose MoE
experts live in its safetensors file (read per expert, :mod:`moelab.serve.store`), cached under a
measured budget (:mod:`moelab.serve.cache`), optionally prefetched by the next layer's router
(:mod:`moelab.serve.prefetch`); :func:`load_offloaded` does it for a run directory. Every check
(the layers, the routers' ``causal_at_inference``, the file, the budget) runs before any token
is decoded, and fails in one line.
"""

from __future__ import annotations

import time
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import nn

from moelab.checkpoint_io import CheckpointError
from moelab.layers import MoE
from moelab.model import TransformerLM
from moelab.serve.cache import ExpertCache, check_policy
from moelab.serve.hook import OffloadDispatcher
from moelab.serve.lowprec import DEFAULT_THRESHOLD, LowPrecisionExperts, check_miss_options
from moelab.serve.offloadable import check_offloadable
from moelab.serve.options import READ_WORKERS, check_read_workers
from moelab.serve.prefetch import Prefetcher
from moelab.serve.startup import materialize
from moelab.serve.store import PARTS, ExpertStore
from moelab.serve.tiers import parse_bytes, tier

__all__ = ["OffloadSession", "offload_model"]


class OffloadSession:
    """The cache, the file and the counters of one offloaded model (``model.offload``)."""

    def __init__(
        self,
        model: TransformerLM,
        layers: list[tuple[int, MoE]],
        store: ExpertStore,
        budget: int,
        policy: str,
        prefetch: bool,
        miss_precision: str | None = None,
        miss_threshold: float = DEFAULT_THRESHOLD,
        read_workers: int = READ_WORKERS,
    ) -> None:
        check_read_workers(read_workers)
        self.store, self.policy, self.prefetch_enabled = store, policy, prefetch
        self.miss_precision, self.miss_threshold = miss_precision, float(miss_threshold)
        self.slots = [
            store.slots(
                f"blocks.{i}.ffn.experts.",
                moe.num_experts,
                {p: getattr(moe.experts, p).shape for p in PARTS},
            )
            for i, moe in layers
        ]
        self.expert_bytes = [sum(s.stride for s in slots) for slots in self.slots]
        self.total_expert_bytes = sum(
            b * moe.num_experts for b, (_, moe) in zip(self.expert_bytes, layers, strict=True)
        )
        biggest = max(self.expert_bytes)
        if budget < biggest:
            raise ValueError(
                f"--expert-memory: {budget} bytes is smaller than one expert ({biggest} bytes); "
                f"allowed: {biggest} bytes up to the experts' {self.total_expert_bytes}"
            )
        # the low-precision copies live inside the budget: the cache gets what they leave
        self.lowprec = (
            LowPrecisionExperts(miss_precision, [moe.experts for _, moe in layers])
            if miss_precision is not None
            else None
        )
        self.lowprec_bytes = 0 if self.lowprec is None else self.lowprec.nbytes()
        if budget - self.lowprec_bytes < biggest:
            need = self.lowprec_bytes + biggest
            raise ValueError(
                f"--expert-memory: {budget} bytes cannot hold the {miss_precision} copies of "
                f"the experts ({self.lowprec_bytes} bytes) plus one full expert ({biggest} "
                f"bytes); allowed with --miss-precision {miss_precision}: at least {need} bytes "
                f"({100 * need / self.total_expert_bytes:.1f}% of the experts)"
            )
        self.budget = budget
        self.cache = ExpertCache(budget - self.lowprec_bytes, policy, self._allocate)
        # one pool for prefetches and a layer's misses read ahead (``read_workers`` at a time)
        self.read_workers = read_workers
        self.prefetcher = Prefetcher(read_workers) if prefetch or read_workers > 1 else None
        self.ahead: dict[tuple[int, int], Future] = {}  # misses read ahead, not yet used
        self.inline: dict[tuple[int, int], list[torch.Tensor]] = {}  # a miss this thread reads
        self.lowprec_fill_s = 0.0
        self.reset_counters()

    def fill_low_precision(self) -> None:
        """Quantize every expert into its resident copy, reading one expert at a time."""
        if self.lowprec is None:
            return
        t0 = time.perf_counter()

        def read(layer: int, expert: int) -> list[torch.Tensor]:
            buffers = self._allocate((layer, expert))
            self.store.read(self.slots[layer], expert, buffers)
            return buffers

        self.lowprec.fill(read)
        self.lowprec_fill_s = time.perf_counter() - t0

    # ---- called by the dispatchers --------------------------------------------------------------

    def _allocate(self, key: tuple[int, int]) -> list[torch.Tensor]:
        return [torch.empty(s.shape, dtype=s.dtype) for s in self.slots[key[0]]]

    def note_layer(self, layer: int, needed: list[int]) -> None:
        self.used_bytes += len(needed) * self.expert_bytes[layer]
        self.forwards += layer == 0

    def fetch_order(self, layer: int, needed: list[int]) -> list[int]:
        """Loaded experts first, then the miss this thread reads itself (while the pool reads
        the others), then loads in flight, then misses without room yet: compute starts on what
        is here, and a miss never waits behind a pinned in-flight load."""
        entries = self.cache.entries

        def rank(e: int) -> int:
            entry = entries.get((layer, e))
            if entry is None:
                return 3
            return 0 if entry.ready else (1 if (layer, e) in self.inline else 2)

        return sorted(needed, key=rank)

    def use_low_precision(self, layer: int, expert: int, ratio_n: torch.Tensor) -> bool:
        """HOBBIT's rule (:mod:`moelab.serve.lowprec`): a miss (neither held nor in flight)
        whose rows all have a gate below ``miss_threshold`` x their token's top gate is computed
        from its low-precision copy; counted, and the full expert is not read."""
        if self.lowprec is None or not self.miss_threshold > 0:
            return False
        with self.cache.cond:
            if (layer, expert) in self.cache.entries:
                return False
        if not bool((ratio_n < self.miss_threshold).all()):
            return False
        self.lowprec_hits += 1
        self.lowprec_rows += int(ratio_n.numel())
        self.bytes_saved += self.expert_bytes[layer]
        self.lowprec_used.add((layer, expert))
        return True

    def read_ahead(self, layer: int, needed: list[int], pinned: set) -> None:
        """Reserve room for every miss of ``needed`` (with ``read_workers`` > 1) and start
        reading all but the last on the pool; :meth:`fetch` reads the last in this thread
        meanwhile. A lone miss is thus read here: handing it to a worker costs a thread switch
        each way (0.15 ms of a 0.45 ms read, 2-core VM) to overlap only the held experts'
        compute (0.04 ms each). A miss without room (the budget would need a wait) is left to
        :meth:`fetch`. Counted as misses now; :meth:`fetch` waits for them, counting the wait."""
        if self.read_workers < 2:
            return  # (the caller leaves out the misses served from low-precision copies)
        self._forget_inline()
        reserved = []
        for e in needed:
            key = (layer, e)
            self.ahead.pop(key, None)  # a stale read of an interrupted call: the cache has it
            entry = self.cache.reserve_miss(key, self.expert_bytes[layer], pinned)
            if entry is not None:
                reserved.append((key, entry))
        if reserved:
            *to_pool, (key, entry) = reserved
            self.inline[key] = entry.tensors
            for key, entry in to_pool:
                self.ahead[key] = self.prefetcher.submit(self._load, key, entry.tensors)

    def _forget_inline(self) -> None:
        """Return the room of a miss reserved for this thread by a call that was interrupted
        before reading it (it would otherwise stay "in flight" for ever)."""
        for key in self.inline:
            self.cache.drop(key)
        self.inline.clear()

    def fetch(self, layer: int, expert: int, pinned: set) -> list[torch.Tensor]:
        t0 = time.perf_counter()
        mine = self.inline.pop((layer, expert), None)
        if mine is not None:  # reserved and counted by read_ahead, read by this thread
            self._load((layer, expert), mine)
            self.wait_s += time.perf_counter() - t0
            return mine
        read = self.ahead.pop((layer, expert), None)
        if read is not None:  # counted when it was started; wait for it to land
            read.result()
            tensors = self.cache.entries[(layer, expert)].tensors  # pinned: still held
            self.wait_s += time.perf_counter() - t0
            return tensors
        tensors, how = self.cache.get(
            (layer, expert),
            self.expert_bytes[layer],
            pinned,
            lambda bufs: self.store.read(self.slots[layer], expert, bufs),
        )
        if how != "hit":
            self.wait_s += time.perf_counter() - t0
        return tensors

    def prefetch(self, layer: int, experts: list[int], pinned: set) -> None:
        if layer >= len(self.slots) or self.prefetcher is None:
            return
        keys = [(layer, e) for e in experts]
        for key in keys:
            entry = self.cache.reserve_prefetch(key, self.expert_bytes[layer], pinned | set(keys))
            if entry is not None:
                self.prefetcher.submit(self._load, key, entry.tensors)

    def _load(self, key: tuple[int, int], buffers: list[torch.Tensor]) -> None:
        try:
            n = self.store.read(self.slots[key[0]], key[1], buffers)
        except BaseException:
            self.cache.drop(key)
            raise
        self.cache.finish(key, n)

    # ---- counters -------------------------------------------------------------------------------

    def reset_counters(self) -> None:
        """Zero the counters (the cache keeps its contents): measure decoding apart from prefill."""
        if self.prefetcher is not None:
            self.prefetcher.drain()
        self.ahead.clear()
        self._forget_inline()
        self.cache.stats = type(self.cache.stats)(peak_bytes=self.cache.held)
        self.store.reset_counters()
        self.used_bytes, self.forwards, self.wait_s = 0, 0, 0.0
        self.lowprec_hits, self.lowprec_rows, self.bytes_saved = 0, 0, 0
        self.lowprec_used: set[tuple[int, int]] = set()  # (layer, expert) since the reset

    def stats(self) -> dict[str, Any]:
        """Counters since the last reset (prefetches still in flight are waited for first)."""
        if self.prefetcher is not None:
            self.prefetcher.drain()
        s = self.cache.stats
        uses = s.hits + s.late + s.misses
        return {
            "tier": self.store.label(),
            "tier_modelled": self.store.tier.modelled,
            "policy": self.policy,
            "prefetch": self.prefetch_enabled,
            "budget_bytes": self.budget,
            "peak_bytes": s.peak_bytes + self.lowprec_bytes,  # the copies are always held
            "expert_bytes": self.total_expert_bytes,
            "hits": s.hits,
            "late": s.late,
            "misses": s.misses,
            "hit_rate": s.hits / uses if uses else None,
            "prefetch_issued": s.prefetch_issued,
            "prefetch_used": s.prefetch_used,
            "prefetch_accuracy": s.prefetch_used / s.prefetch_issued if s.prefetch_issued else None,
            "evictions": s.evictions,
            "bytes_read": s.bytes_loaded,  # the experts' bytes (disk_bytes: what the file gave)
            "disk_bytes": self.store.disk_bytes,
            "bytes_used": self.used_bytes,
            "read_over_used": s.bytes_loaded / self.used_bytes if self.used_bytes else None,
            "load_wait_s": self.wait_s,
            "forwards": self.forwards,
            "miss_precision": self.miss_precision,
            "miss_threshold": self.miss_threshold if self.lowprec is not None else None,
            "lowprec_bytes": self.lowprec_bytes,
            "lowprec_hits": self.lowprec_hits,
            "lowprec_rows": self.lowprec_rows,
            "bytes_saved": self.bytes_saved,
            "lowprec_fill_s": self.lowprec_fill_s,
        }

    def close(self) -> None:
        if self.prefetcher is not None:
            self.prefetcher.close()
        self.store.close()


def offload_model(
    model: TransformerLM,
    weights: str | Path,
    expert_memory: str | int,
    *,
    policy: str = "lru",
    prefetch: bool = False,
    tier_name: str = "disk",
    load_resident: bool = False,
    miss_precision: str | None = None,
    miss_threshold: float = DEFAULT_THRESHOLD,
    read_workers: int = READ_WORKERS,
) -> OffloadSession:
    """Serve ``model``'s experts from ``weights`` (its safetensors file) under ``expert_memory``
    bytes (``"64MB"``, ``"25%"`` of the experts, an int). The experts' parameters are dropped
    from the model (it is for inference only afterwards); ``load_resident`` also loads every
    other weight from the file (required for a model built on the meta device, see
    :mod:`moelab.serve.startup`, whose resident tensors are materialised first).
    ``miss_precision`` (``"int8"``/``"int4"``) keeps a low-precision copy of every expert inside
    the budget for misses below ``miss_threshold`` (:mod:`moelab.serve.lowprec`).
    ``read_workers``: reads in flight at once (a layer's misses read together, prefetches); 1
    reads one expert at a time. Returns the session (also ``model.offload``)."""
    tier_ = tier(tier_name)
    check_read_workers(read_workers)
    budget = parse_bytes(expert_memory)
    check_policy(policy)
    check_miss_options(miss_precision, miss_threshold)
    layers = check_offloadable(model)
    on_meta = model.tok_emb.weight.device.type == "meta"
    if on_meta and not load_resident:
        raise ValueError("offload_model: a model built on the meta device needs load_resident")
    store = ExpertStore(Path(weights), tier_)
    try:
        if isinstance(budget, float):
            shapes = [
                moe.experts.w13_EDF2.numel() + moe.experts.w2_EFD.numel() for _, moe in layers
            ]
            size = model.blocks[layers[0][0]].ffn.experts.w13_EDF2.element_size()
            budget = int(budget * sum(shapes) * size)
        session = OffloadSession(
            model,
            layers,
            store,
            budget,
            policy,
            prefetch,
            miss_precision,
            miss_threshold,
            read_workers,
        )
        if load_resident and not on_meta:
            _load_resident(model, store)
    except BaseException:
        store.close()
        raise
    moes = [moe for _, moe in layers]
    for n, moe in enumerate(moes):
        nxt = moes[n + 1].router if n + 1 < len(moes) else None
        dispatcher = OffloadDispatcher(session, n, moe.experts, nxt)
        moe.register_forward_pre_hook(dispatcher.remember_call, with_kwargs=True)
        moe.dispatcher = dispatcher
        for part in PARTS:  # the experts now live in the file: free their memory
            old = getattr(moe.experts, part)
            empty = torch.empty(0, dtype=old.dtype)  # on the CPU, also for a meta-built model
            setattr(moe.experts, part, nn.Parameter(empty, requires_grad=False))
    try:
        if on_meta:
            materialize(model)
            _load_resident(model, store)
        session.fill_low_precision()
    except BaseException:
        session.close()
        raise
    model.offload = session
    return session


def _load_resident(model: TransformerLM, store: ExpertStore) -> None:
    """Every weight but the experts from the file (a tied weight stored once is found by its
    shared storage); CheckpointError naming the file when one is missing."""
    state = model.state_dict()
    in_file = set(store.keys())
    loaded: dict[int, str] = {}
    missing = []
    with safe_open(str(store.path), framework="pt") as f:
        for name, t in state.items():
            if name.rsplit(".", 1)[-1] in PARTS and ".experts." in name:
                continue
            if name in in_file:
                saved = f.get_tensor(name)
                if saved.shape != t.shape:
                    raise CheckpointError(
                        f"{store.path}: {name} is {list(saved.shape)} in the file, "
                        f"{list(t.shape)} in the model"
                    )
                with torch.no_grad():
                    t.copy_(saved)
                loaded[t.data_ptr()] = name
            else:
                missing.append((name, t))
    for name, t in missing:
        if t.data_ptr() not in loaded:
            raise CheckpointError(f"{store.path}: no tensor {name!r} (not this model's file?)")
