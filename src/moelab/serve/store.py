"""Per-expert reads from a run's ``model.safetensors``: byte ranges, no export, no copy of the file.

Why byte ranges: moelab's checkpoints are already safetensors, and an MoE layer stores its experts
as two 3-D tensors, ``w13_EDF2 [E, D, 2F]`` and ``w2_EFD [E, F, D]`` (row-major), so expert ``e``
of a tensor is one contiguous range, ``begin + e·(end − begin)/E``. Reading that range straight
into a preallocated tensor needs neither a second per-expert file in the run directory (which a
run would have to own and keep in step with its checkpoints) nor any copy. The header (8-byte
little-endian length, then JSON) is parsed once, and the file is checked before decoding starts:
a missing file, a bad header, a tensor of the wrong shape or a file shorter than its header says
is one line naming the file.

A tier that reads cold (``disk``) reads through ``O_DIRECT`` (:mod:`moelab.serve.direct`): no page
cache to drop and no kernel copy. Where the filesystem refuses it, the store says so in
:meth:`ExpertStore.label` and reads buffered after dropping the range's page cache.
"""

from __future__ import annotations

import errno
import json
import os
import struct
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from moelab.checkpoint_io import CheckpointError
from moelab.serve.direct import DirectReader, open_direct
from moelab.serve.tiers import Tier

__all__ = ["ExpertSlot", "ExpertStore"]

_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
}
PARTS = ("w13_EDF2", "w2_EFD")  # GroupedExperts' two weights, in the order a load returns them


@dataclass(frozen=True)
class ExpertSlot:
    """Where one weight of one MoE layer lives in the file: its absolute byte offset, the bytes
    of one expert's slice and that slice's shape and dtype."""

    offset: int
    stride: int
    shape: tuple[int, ...]
    dtype: torch.dtype


class ExpertStore:
    """Reads expert ``e`` of a layer (prefix ``blocks.3.ffn.experts.``) from a safetensors file.

    Thread-safe: every read is a positional ``os.preadv`` on a shared descriptor (with
    ``O_DIRECT``, into the reading thread's own staging buffer). ``direct``: read through
    ``O_DIRECT`` where the tier asks for it (False: always the buffered path, to compare).
    ``disk_bytes``: bytes the reads asked the file for since the last reset, with ``O_DIRECT``
    the aligned ranges the device really transferred (buffered: the experts' ranges; the
    kernel's readahead is not seen).
    """

    def __init__(self, path: Path, tier: Tier, direct: bool = True) -> None:
        self.path = Path(path)
        self.tier = tier
        if not self.path.is_file():
            raise CheckpointError(f"{self.path}: missing weights file")
        self.size = self.path.stat().st_size
        self.header, self.data_start = _read_header(self.path, self.size)
        self.fd = os.open(self.path, os.O_RDONLY)
        self.link_lock = threading.Lock()
        self.link_free = 0.0  # a modelled link: when the transfers booked so far end
        self.direct: DirectReader | None = None
        self.direct_refused: str | None = None  # why O_DIRECT is not used, where the tier wants it
        if tier.direct and direct:
            self.direct, self.direct_refused = open_direct(self.path)
        self.count_lock = threading.Lock()
        self.disk_bytes = 0

    def reset_counters(self) -> None:
        with self.count_lock:
            self.disk_bytes = 0

    @property
    def reads_direct(self) -> bool:
        """Whether reads go through ``O_DIRECT`` now (opened, and not refused since)."""
        return self.direct is not None and self.direct_refused is None

    def label(self) -> str:
        """The tier's label and how this store reads it (``O_DIRECT``, or why not)."""
        if not self.tier.direct:
            return self.tier.label()
        if self.reads_direct:
            return f"{self.tier.name} (real reads, O_DIRECT)"
        why = self.direct_refused or "O_DIRECT off"
        return f"{self.tier.name} (real reads, page cache dropped; {why})"

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        if self.direct is not None:
            self.direct.close()

    def keys(self) -> list[str]:
        return [k for k in self.header if k != "__metadata__"]

    def slots(self, prefix: str, num_experts: int, shapes: dict[str, tuple[int, ...]]) -> list:
        """The two :class:`ExpertSlot` of the layer at ``prefix`` (``w13`` then ``w2``), checked
        against the model's shapes ``[E, ...]``; CheckpointError naming the file otherwise."""
        out = []
        for part in PARTS:
            name = prefix + part
            info = self.header.get(name)
            if info is None:
                raise CheckpointError(f"{self.path}: no tensor {name!r} (not this model's file?)")
            shape = tuple(info["shape"])
            if shape != tuple(shapes[part]):
                raise CheckpointError(
                    f"{self.path}: {name} is {list(shape)} in the file, "
                    f"{list(shapes[part])} in the model"
                )
            dtype = _DTYPES.get(info["dtype"])
            if dtype is None:
                raise CheckpointError(f"{self.path}: {name} has unsupported dtype {info['dtype']}")
            begin, end = info["data_offsets"]
            out.append(
                ExpertSlot(self.data_start + begin, (end - begin) // num_experts, shape[1:], dtype)
            )
        return out

    def read(self, slots: list[ExpertSlot], expert: int, into: list[torch.Tensor]) -> int:
        """Read expert ``expert``'s slices into the CPU tensors ``into`` (preallocated, one per
        slot); returns the expert's bytes (what the cache books; :attr:`disk_bytes` counts what
        came off the device). Follows the tier: ``O_DIRECT`` or drop the page cache of the range
        first (real disk), or sleep until the link has carried the bytes (modelled): one link, so
        reads in flight together share its bandwidth, each booked after those before it."""
        start = time.perf_counter()
        total = disk = 0
        for slot, out in zip(slots, into, strict=True):
            offset = slot.offset + expert * slot.stride
            disk += self._read_range(offset, slot.stride, out)
            total += slot.stride
        with self.count_lock:
            self.disk_bytes += disk
        if self.tier.bandwidth is not None:
            with self.link_lock:
                self.link_free = max(self.link_free, start) + total / self.tier.bandwidth
                done = self.link_free
            left = done - time.perf_counter()
            if left > 0:
                time.sleep(left)
        return total

    def _read_range(self, offset: int, length: int, out: torch.Tensor) -> int:
        """``length`` bytes at ``offset`` into ``out``; the bytes asked of the file."""
        if self.reads_direct:
            try:
                return self.direct.read(offset, length, out)
            except EOFError:
                raise self._short_read(offset) from None
            except OSError as err:
                if err.errno != errno.EINVAL:
                    raise
                # refused at the first read (opened fine): buffered from now on; the descriptor
                # stays open until close(), another thread may still be in a read on it
                self.direct_refused = f"O_DIRECT refused on read: {err.strerror or err}"
        if self.tier.drop_page_cache:
            os.posix_fadvise(self.fd, offset, length, os.POSIX_FADV_DONTNEED)
        view = memoryview(out.view(torch.uint8).numpy()).cast("B")
        got = os.preadv(self.fd, [view], offset)
        if got != length:
            raise self._short_read(offset)
        return got

    def _short_read(self, offset: int) -> CheckpointError:
        return CheckpointError(f"{self.path}: short read at byte {offset} (file changed?)")


def _read_header(path: Path, size: int) -> tuple[dict, int]:
    """The JSON header and where the data starts; CheckpointError for a file that is not
    safetensors or shorter than its header says (a truncated checkpoint)."""
    try:
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise ValueError("shorter than a safetensors header")
            (n,) = struct.unpack("<Q", head)
            if n > min(size - 8, 100_000_000):
                raise ValueError(f"header of {n} bytes does not fit the file")
            header = json.loads(f.read(n))
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{path}: corrupt or truncated weights file ({err})") from None
    data_start = 8 + n
    ends = [v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"]
    if data_start + max(ends, default=0) > size:
        raise CheckpointError(
            f"{path}: truncated weights file ({size} bytes, the header needs "
            f"{data_start + max(ends)})"
        )
    return header, data_start
