"""The offloaded model's short decode step and its concurrent reads (moelab.serve.hook
``decode_rows``, ``OffloadSession.read_ahead``): each step's logits equal the loaded model's
general forward (grouped experts, a different computation) to float tolerance and the loaded
short step's bits, for a TopK and a ReLU model, at batch 1 and for a left-padded batch; a layer's
misses are really read at once, change no token, and keep the counters and the budget right."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from moelab.model.decode_step import FastStep
from moelab.model.generate import left_pad
from moelab.serve import offload_model
from run_fixtures import one_torch_thread  # noqa: F401
from test_offload import greedy, offloaded, preset_model, saved

PROMPTS = [[5, 9, 2], [7, 1, 3, 3, 8, 4, 6], [11, 2, 40, 3, 9]]
STEPS = 6


def step_logits(model, ids, pad_B, fast: bool) -> list[torch.Tensor]:
    """Logits of ``STEPS`` greedy steps after the prompt: :class:`FastStep` or the forward."""
    cache = model.new_kv_cache(ids.shape[0], max_len=ids.shape[1] + STEPS)
    if pad_B is not None:
        cache.set_left_padding(pad_B)
    out = []
    with torch.no_grad():
        nxt = model(ids, kv_cache=cache)[:, -1].argmax(-1)
        step = FastStep(model, cache) if fast else None
        if step is not None:
            assert all(step.moe_fast), "every MoE layer should take the short path"
        for _ in range(STEPS):
            logits = step(nxt) if step else model(nxt[:, None], kv_cache=cache)[:, -1]
            out.append(logits)
            nxt = logits.argmax(-1)
    return out


def prompt_batch(batch: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One prompt (no padding) or all of :data:`PROMPTS` left-padded, with its padding counts."""
    if batch == 1:
        return torch.tensor([PROMPTS[1]]), None
    ids, mask = left_pad(PROMPTS)
    return ids, (mask == 0).sum(1)


@pytest.mark.parametrize("preset", ["topk-tiny", "remoe-tiny"])
@pytest.mark.parametrize("batch", [1, 3])
def test_offloaded_short_step_equals_the_loaded_model(preset, batch, tmp_path):
    model = preset_model(preset, top_k=2) if preset == "topk-tiny" else preset_model(preset)
    weights = saved(model, tmp_path)
    ids, pad_B = prompt_batch(batch)
    forward = step_logits(model, ids, pad_B, fast=False)
    short = step_logits(model, ids, pad_B, fast=True)
    served = offloaded(model, weights, "30%", tier_name="nvme3")
    got = step_logits(served, ids, pad_B, fast=True)
    stats = served.offload.stats()
    served.offload.close()
    assert stats["misses"] > 0 and stats["evictions"] > 0  # read from the file, under budget
    for want, same, have in zip(forward, short, got, strict=True):
        torch.testing.assert_close(have, want, rtol=1e-5, atol=1e-5)
        assert torch.equal(have, same)  # the same arithmetic as the loaded short step


class SlowReads:
    """Wraps a store's ``read``: each read sleeps a little and the most reads at once is kept."""

    def __init__(self, read) -> None:
        self.read, self.lock = read, threading.Lock()
        self.now = self.most = self.total = 0  # reads in flight, most at once, bytes returned
        self.here = 0  # reads made by the decoding (main) thread itself

    def __call__(self, *args) -> int:
        with self.lock:
            self.now += 1
            self.most = max(self.most, self.now)
            self.here += threading.current_thread() is threading.main_thread()
        time.sleep(0.003)
        n = self.read(*args)
        with self.lock:
            self.now -= 1
            self.total += n
        return n


@pytest.mark.parametrize("prefetch", [False, True])
def test_misses_are_read_at_once_and_counted_right(prefetch, tmp_path):
    model = preset_model("topk-tiny", top_k=2)
    weights = saved(model, tmp_path)
    want = greedy(model)
    runs = {}
    for workers in (1, 4):
        served = offloaded(model, weights, "40%", prefetch=prefetch, read_workers=workers)
        session = served.offload
        slow = session.store.read = SlowReads(session.store.read)
        got = greedy(served)
        stats = session.stats()
        one = session.expert_bytes[0]  # every layer's experts have the same size here
        session.close()
        assert torch.equal(got, want), workers
        uses = stats["hits"] + stats["late"] + stats["misses"]
        assert uses * one == stats["bytes_used"]  # every use counted once
        reads = stats["misses"] + stats["prefetch_issued"]
        assert stats["bytes_read"] == reads * one == slow.total
        assert stats["peak_bytes"] <= stats["budget_bytes"]
        runs[workers] = slow.most, stats["load_wait_s"]
    assert runs[1][0] <= 1 + prefetch  # one demand read at a time (beside one prefetch)
    assert runs[4][0] >= 2  # a layer's two misses (k = 2) in flight together
    assert runs[4][1] > 0 and runs[1][1] > 0  # the waits are counted either way


def test_read_workers_is_checked_before_any_work(tmp_path):
    model = preset_model("topk-tiny")
    weights = saved(model, tmp_path)
    for bad in (0, 2.5, True):
        with pytest.raises(ValueError, match="read_workers: must be an integer >= 1"):
            offload_model(model, weights / "absent.safetensors", "30%", read_workers=bad)
    assert torch.equal(greedy(offloaded(model, weights, read_workers=1)), greedy(model))


def test_a_modelled_link_is_shared_by_reads_in_flight(tmp_path):
    """Two reads at once on a modelled 1 MB/s link take as long as two in a row (one link),
    not as long as one (each its own bandwidth)."""
    from concurrent.futures import ThreadPoolExecutor

    from moelab.serve.store import ExpertStore
    from moelab.serve.tiers import Tier

    model = preset_model("topk-tiny")
    weights = saved(model, tmp_path)
    store = ExpertStore(weights, Tier("slow", 1e6, False, "a 1 MB/s link"))
    experts = model.blocks[0].ffn.experts
    shapes = {"w13_EDF2": experts.w13_EDF2.shape, "w2_EFD": experts.w2_EFD.shape}
    slots = store.slots("blocks.0.ffn.experts.", 8, shapes)
    one = sum(s.stride for s in slots) / 1e6  # seconds per expert on the link

    def read(e: int) -> torch.Tensor:
        into = [torch.empty(s.shape, dtype=s.dtype) for s in slots]
        store.read(slots, e, into)
        return into[1]

    t0 = time.perf_counter()
    with ThreadPoolExecutor(2) as pool:
        got = list(pool.map(read, [3, 5]))
    elapsed = time.perf_counter() - t0
    store.close()
    assert elapsed >= 2 * one * 0.95
    assert torch.equal(got[0], experts.w2_EFD[3]) and torch.equal(got[1], experts.w2_EFD[5])


def test_the_decoding_thread_reads_one_miss_itself(tmp_path):
    """Of a layer's misses, all but one go to the read pool and the decoding thread reads the
    last meanwhile: a lone miss costs no thread switch, two still overlap (k = 2 and a cold
    cache: the pool alone used to read every miss here)."""
    model = preset_model("topk-tiny", top_k=2)
    served = offloaded(model, saved(model, tmp_path), "100%", read_workers=4)
    reads = served.offload.store.read = SlowReads(served.offload.store.read)
    assert torch.equal(greedy(served), greedy(model))
    misses = served.offload.stats()["misses"]
    served.offload.close()
    assert 0 < reads.here < misses and reads.most >= 2


def test_a_call_interrupted_after_its_reads_are_reserved_leaves_nothing_stuck(tmp_path):
    """An error (or Ctrl-C) between reserving a layer's misses and reading them leaves the miss
    this thread was to read reserved but never loaded: the next call must give its room back
    (not wait for it for ever) and decode the loaded model's tokens."""
    model = preset_model("topk-tiny", top_k=2)
    served = offloaded(model, saved(model, tmp_path), "100%", read_workers=4)
    session = served.offload
    real_fetch = session.fetch

    def fail_once(*args):
        session.fetch = real_fetch
        raise KeyboardInterrupt

    session.fetch = fail_once
    with pytest.raises(KeyboardInterrupt):
        greedy(served)
    stuck = set(session.inline)  # the interrupted call's own miss, reserved and never read
    assert stuck and not any(session.cache.entries[k].ready for k in stuck)
    session.read_ahead(len(served.blocks) - 1, [], set())  # the next layer call starts
    assert not stuck & set(session.cache.entries)  # its room is back, nothing waits for it
    done: list[torch.Tensor] = []
    worker = threading.Thread(target=lambda: done.append(greedy(served)), daemon=True)
    worker.start()
    worker.join(timeout=30)
    entries = dict(session.cache.entries)
    session.close()
    assert done and torch.equal(done[0], greedy(model))
    # nothing left "in flight" for ever: the stale reservation was returned (or loaded)
    assert all(e.ready for e in entries.values()), [k for k, e in entries.items() if not e.ready]
