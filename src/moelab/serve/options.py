"""The offloading options of ``moelab generate`` (no torch import: the CLI builds its parser
before it knows which command runs)."""

from __future__ import annotations

import argparse

from moelab.serve.tiers import TIERS

__all__ = [
    "MISS_PRECISIONS",
    "POLICIES",
    "READ_WORKERS",
    "add_offload_arguments",
    "add_read_workers_argument",
    "check_read_workers",
]

POLICIES = ("lru", "lfu")  # eviction policies of moelab.serve.cache.ExpertCache
MISS_PRECISIONS = ("int8", "int4")  # low-precision expert copies (moelab.serve.lowprec)
READ_WORKERS = 4
"""Expert reads in flight at once (a layer's misses read together, and the prefetches); 1
reads one expert at a time (beside one prefetch)."""


def check_read_workers(read_workers: int, field: str = "read_workers") -> None:
    """A one-line ValueError naming ``field`` unless ``read_workers`` is an integer >= 1."""
    if isinstance(read_workers, bool) or not isinstance(read_workers, int) or read_workers < 1:
        raise ValueError(f"{field}: must be an integer >= 1, got {read_workers!r}")


def add_read_workers_argument(p: argparse.ArgumentParser) -> None:
    """``--read-workers N`` (default None: the session's :data:`READ_WORKERS`), for ``generate``
    and ``bench offload``; check the value with :func:`check_read_workers`."""
    p.add_argument(
        "--read-workers",
        type=int,
        default=None,
        metavar="N",
        help=f"expert reads in flight at once (a layer's misses together, prefetches); 1 reads "
        f"one at a time (default {READ_WORKERS})",
    )


def add_offload_arguments(p: argparse.ArgumentParser) -> None:
    """``--expert-memory``, ``--expert-policy``, ``--prefetch``, ``--tier``, ``--read-workers``,
    ``--miss-precision``, ``--miss-threshold``."""
    p.add_argument(
        "--expert-memory",
        metavar="SIZE",
        help="serve MoE experts from the checkpoint file under this budget (64MB, 1GiB, or 25%% "
        "of the experts' bytes); default: every weight in memory",
    )
    p.add_argument(
        "--expert-policy", default="lru", choices=POLICIES, help="cache eviction (default: lru)"
    )
    p.add_argument(
        "--prefetch",
        action="store_true",
        help="load the experts the next layer's router predicts on a background thread",
    )
    p.add_argument(
        "--tier",
        default="disk",
        choices=list(TIERS),
        help="where experts come from: disk (real, O_DIRECT or page cache dropped) or a "
        "modelled link",
    )
    add_read_workers_argument(p)
    p.add_argument(
        "--miss-precision",
        default=None,
        choices=MISS_PRECISIONS,
        help="keep a resident int8/int4 copy of every expert (inside the budget); a missed expert "
        "with a small gate weight is computed from it instead of loaded (HOBBIT)",
    )
    p.add_argument(
        "--miss-threshold",
        type=float,
        default=None,
        metavar="SHARE",
        help="with --miss-precision: a missed expert runs in low precision when its gate weight "
        "is below SHARE x the token's top gate weight (default 0.5; 0 = never)",
    )
