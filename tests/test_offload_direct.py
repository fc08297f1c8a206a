"""The real-disk tier's ``O_DIRECT`` reads (moelab.serve.direct): every expert's bytes equal the
file's as safetensors loads them, ranges that start or end inside a block included; the bytes
that came off the device are the aligned blocks the ranges touch; a filesystem that refuses
``O_DIRECT`` (at open or at the first read) falls back to the buffered path, says so in the
label, and still reads the right bytes and decodes the loaded model's tokens."""

from __future__ import annotations

import errno
import os

import pytest
import torch
from safetensors import safe_open

from moelab.serve.direct import ALIGN
from moelab.serve.store import PARTS, ExpertStore
from moelab.serve.tiers import tier
from run_fixtures import one_torch_thread  # noqa: F401
from test_offload import greedy, offloaded, preset_model, saved

E = 8


def read_every_expert(store: ExpertStore, model) -> tuple[int, list]:
    """Read every expert of every MoE layer through ``store`` and compare with safetensors;
    returns the bytes read and every ``(offset, length)`` range."""
    total, ranges = 0, []
    with safe_open(str(store.path), framework="pt") as f:
        for i in range(len(model.blocks)):
            prefix = f"blocks.{i}.ffn.experts."
            want = [f.get_tensor(prefix + part) for part in PARTS]
            slots = store.slots(prefix, E, {p: w.shape for p, w in zip(PARTS, want, strict=True)})
            for e in reversed(range(E)):  # out of file order: no help from a sequential read
                into = [torch.full(s.shape, float("nan"), dtype=s.dtype) for s in slots]
                total += store.read(slots, e, into)
                for s, got, w in zip(slots, into, want, strict=True):
                    assert torch.equal(got, w[e]), (i, e)
                    ranges.append((s.offset + e * s.stride, s.stride))
    return total, ranges


def blocks_touched(ranges: list, size: int) -> int:
    """Bytes of the distinct ALIGN blocks each range touches (clipped at the end of the file),
    range by range: what O_DIRECT must transfer."""
    out = 0
    for offset, length in ranges:
        blocks = range(offset // ALIGN, (offset + length - 1) // ALIGN + 1)
        out += sum(min((b + 1) * ALIGN, size) - b * ALIGN for b in blocks)
    return out


def test_direct_reads_equal_the_file_for_every_expert(tmp_path):
    model = preset_model("topk-tiny")
    weights = saved(model, tmp_path)
    store = ExpertStore(weights, tier("disk"))
    assert store.direct is not None, store.direct_refused  # ext4/tmpfs here accept O_DIRECT
    assert store.label() == "disk (real reads, O_DIRECT)"
    total, ranges = read_every_expert(store, model)
    assert total == sum(n for _, n in ranges)  # the cache books the experts' bytes
    assert store.disk_bytes == blocks_touched(ranges, store.size) > total
    # the cases the alignment must handle are really there
    assert any(o % ALIGN for o, _ in ranges) and any((o + n) % ALIGN for o, n in ranges)
    assert any(o // ALIGN != (o + n - 1) // ALIGN for o, n in ranges)  # across a block edge
    store.reset_counters()
    assert store.disk_bytes == 0
    store.close()


def test_direct_read_refuses_an_output_it_cannot_fill_whole(tmp_path):
    """The bytes are copied to ``out``'s address: a strided or wrongly sized ``out`` is refused
    (it would be written past its elements), not filled wrongly."""
    model = preset_model("topk-tiny")
    store = ExpertStore(saved(model, tmp_path), tier("disk"))
    slot = store.slots(
        "blocks.0.ffn.experts.",
        E,
        {p: getattr(model.blocks[0].ffn.experts, p).shape for p in PARTS},
    )[0]
    whole = torch.empty(slot.shape, dtype=slot.dtype)
    for bad in (whole.t(), whole[:-1]):
        with pytest.raises(ValueError, match="contiguous tensor of"):
            store.direct.read(slot.offset, slot.stride, bad)
    store.close()


def refuse_direct_open(monkeypatch) -> None:
    real_open = os.open

    def fake_open(path, flags, *args, **kw):
        if flags & os.O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_open(path, flags, *args, **kw)

    monkeypatch.setattr(os, "open", fake_open)


def test_refused_at_open_falls_back_to_buffered_reads(tmp_path, monkeypatch):
    model = preset_model("topk-tiny")
    weights = saved(model, tmp_path)
    refuse_direct_open(monkeypatch)
    store = ExpertStore(weights, tier("disk"))
    assert store.direct is None
    assert "page cache dropped; O_DIRECT refused: Invalid argument" in store.label()
    total, ranges = read_every_expert(store, model)
    assert store.disk_bytes == total == sum(n for _, n in ranges)
    store.close()


def test_refused_at_the_first_read_falls_back_once(tmp_path, monkeypatch):
    model = preset_model("topk-tiny")
    weights = saved(model, tmp_path)
    store = ExpertStore(weights, tier("disk"))
    direct_fd, real_preadv, calls = store.direct.fd, os.preadv, []

    def fake_preadv(fd, buffers, offset, *args):
        if fd == direct_fd:
            calls.append(offset)
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_preadv(fd, buffers, offset, *args)

    monkeypatch.setattr(os, "preadv", fake_preadv)
    total, _ = read_every_expert(store, model)
    assert len(calls) == 1  # tried once, buffered from then on
    assert "O_DIRECT refused on read" in store.label() and store.disk_bytes == total
    store.close()
    assert store.direct.fd == -1  # the refused descriptor is closed with the store


@pytest.mark.parametrize("refused", [False, True])
def test_disk_tier_decodes_the_loaded_tokens_direct_or_not(refused, tmp_path, monkeypatch):
    model = preset_model("topk-tiny", top_k=2)
    weights = saved(model, tmp_path)
    if refused:
        refuse_direct_open(monkeypatch)
    want = greedy(model)
    for workers in (1, 4):
        served = offloaded(model, weights, "30%", tier_name="disk", read_workers=workers)
        got = greedy(served)
        stats = served.offload.stats()
        served.offload.close()
        assert torch.equal(got, want), workers
        assert ("O_DIRECT refused" in stats["tier"]) == refused
        assert stats["misses"] > 0
        assert (stats["disk_bytes"] > stats["bytes_read"]) == (not refused)
