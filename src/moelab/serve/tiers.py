"""Where offloaded expert weights come from: the slow tier a load pays for.

``disk`` is real: the run's safetensors file read with ``O_DIRECT`` (:mod:`moelab.serve.direct`:
no page cache, the device writes into an aligned buffer), or, where the filesystem refuses it,
with ``pread`` after ``posix_fadvise(POSIX_FADV_DONTNEED)`` on the range, so the page cache does
not turn a "cold" read into a memory copy (the kernel drops clean cached pages first). The other
tiers are *modelled*: the bytes are read the same way but without dropping the page cache, and
the load then sleeps until the link would have carried its bytes: one link per file, so loads in
flight together share its bandwidth (each is booked after those before it; concurrent reads get no
free bandwidth from the model). Counters and docs say "modelled" for those, never "measured".
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["TIERS", "Tier", "parse_bytes", "tier"]


@dataclass(frozen=True)
class Tier:
    """A slow tier: ``bandwidth`` in bytes/s for modelled tiers (None: real, unthrottled);
    ``direct``: read cold through ``O_DIRECT`` where the filesystem allows it."""

    name: str
    bandwidth: float | None
    drop_page_cache: bool
    description: str
    direct: bool = False

    @property
    def modelled(self) -> bool:
        return self.bandwidth is not None

    def label(self) -> str:
        if self.bandwidth is None:
            return f"{self.name} (real reads, page cache dropped)"
        return f"{self.name} (modelled: {self.bandwidth / 1e9:g} GB/s)"


TIERS: dict[str, Tier] = {
    t.name: t
    for t in (
        Tier("disk", None, True, "the run's local file: O_DIRECT, or page cache dropped", True),
        # PCIe 3.0 x16 host-to-device: ~16 GB/s nominal (15.75 GB/s after 128b/130b coding)
        Tier("pcie16", 16e9, False, "modelled PCIe x16 link at 16 GB/s"),
        # a PCIe 3.0 x4 NVMe drive's sequential read, ~3 GB/s
        Tier("nvme3", 3e9, False, "modelled NVMe drive at 3 GB/s"),
    )
}


def tier(name: str) -> Tier:
    """The tier called ``name``; a one-line ValueError naming ``--tier`` and the choices."""
    if name not in TIERS:
        raise ValueError(f"--tier: must be one of {', '.join(TIERS)}, got {name!r}")
    return TIERS[name]


_UNITS = {
    "": 1,
    "B": 1,
    "KB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "KIB": 2**10,
    "MIB": 2**20,
    "GIB": 2**30,
}


def parse_bytes(text: str | int, field: str = "--expert-memory") -> int | float:
    """``"64MB"`` → 64_000_000 bytes (KB/MB/GB powers of 10, KiB/MiB/GiB powers of 2; a bare
    number is bytes). ``"25%"`` → 0.25, a fraction of the experts' bytes, resolved by the caller.
    One-line ValueError naming ``field`` otherwise."""
    if isinstance(text, int) and not isinstance(text, bool):
        value: int | float = text
    else:
        raw = str(text).strip().upper().replace(" ", "")
        try:
            if raw.endswith("%"):
                frac = float(raw[:-1]) / 100.0
                if not frac > 0:
                    raise ValueError
                return frac
            number = raw.rstrip("KMGIB")
            unit = raw[len(number) :]
            if unit not in _UNITS:
                raise ValueError
            value = float(number) * _UNITS[unit]
        except ValueError:
            raise ValueError(
                f"{field}: expected a size such as 64MB, 512KiB, 2GB, 1000000 or 25% (of the "
                f"experts' bytes), got {text!r}"
            ) from None
    if not value > 0:
        raise ValueError(f"{field}: must be > 0 bytes, got {text!r}")
    return int(value)
