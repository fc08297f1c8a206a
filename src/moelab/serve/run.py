"""Offloading a run directory, and the counters' report ``moelab generate`` prints.

``moelab generate RUN --expert-memory 64MB [--expert-policy lru|lfu] [--prefetch]
[--tier disk|pcie16|nvme3] [--miss-precision int8|int4 [--miss-threshold 0.5]]`` builds the
run's model on the meta device (no expert is ever allocated, :mod:`moelab.serve.startup`), loads
every weight but the experts from its checkpoint's ``model.safetensors``, and serves the experts
from that file.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import IO, Any

from moelab.checkpoint_io import CheckpointError
from moelab.model import TransformerLM
from moelab.rundir import RunDir
from moelab.serve.cache import check_policy
from moelab.serve.lowprec import DEFAULT_THRESHOLD, check_miss_options
from moelab.serve.offload import OffloadSession, offload_model
from moelab.serve.options import READ_WORKERS, check_read_workers
from moelab.serve.startup import build_meta, meta_buildable
from moelab.serve.tiers import parse_bytes, tier
from moelab.train import RunConfig, load_run_config

__all__ = ["load_offloaded", "offload_source", "print_stats"]


def load_offloaded(
    run_dir: str | Path,
    expert_memory: str | int,
    *,
    policy: str = "lru",
    prefetch: bool = False,
    tier_name: str = "disk",
    checkpoint: str | int | Path | None = None,
    miss_precision: str | None = None,
    miss_threshold: float = DEFAULT_THRESHOLD,
    meta: bool = True,
    read_workers: int = READ_WORKERS,
) -> tuple[TransformerLM, RunConfig, OffloadSession]:
    """``(model, run_config, session)`` of a run with its experts offloaded (see
    :func:`~moelab.serve.offload.offload_model`); options are checked before the model is built.
    ``meta``: build on the meta device, so no expert is ever allocated (falls back to a CPU build
    for a model with non-persistent buffers outside its routers)."""
    tier(tier_name)
    parse_bytes(expert_memory)
    check_policy(policy)
    check_miss_options(miss_precision, miss_threshold)
    check_read_workers(read_workers)
    config = load_run_config(run_dir)
    weights = offload_source(run_dir, checkpoint)
    model = build_meta(config.model) if meta else None
    if model is None or not meta_buildable(model):
        model = TransformerLM(config.model).eval()
    session = offload_model(
        model,
        weights,
        expert_memory,
        policy=policy,
        prefetch=prefetch,
        tier_name=tier_name,
        load_resident=True,
        miss_precision=miss_precision,
        miss_threshold=miss_threshold,
        read_workers=read_workers,
    )
    return model, config, session


def offload_source(run_dir: str | Path, checkpoint: str | int | Path | None = None) -> Path:
    """The weights file experts are served from: the checkpoint's ``model.safetensors``, refused
    in one line for a sharded checkpoint (no single file holds every expert)."""
    run = RunDir(run_dir)
    ckpt = run.find_checkpoint(checkpoint)
    if run.is_sharded(ckpt):
        raise CheckpointError(
            f"{ckpt}: a sharded checkpoint (several processes); experts are served from "
            f"{run.WEIGHTS}: load and save it on one process first"
        )
    return ckpt / run.WEIGHTS


def print_stats(stats: dict[str, Any], file: IO[str] | None = None) -> None:
    """The counters in a few lines (``moelab generate`` prints them to stderr after the text).
    ``file`` defaults to the *current* ``sys.stderr`` (a default bound at import would keep
    writing to whatever stream was installed then, e.g. a closed test capture)."""
    file = sys.stderr if file is None else file

    def pct(v: float | None) -> str:
        return "n/a" if v is None else f"{100 * v:.1f}%"

    mb = 1e6
    print(
        f"experts offloaded: tier {stats['tier']}, policy {stats['policy']}, prefetch "
        f"{'on' if stats['prefetch'] else 'off'}; budget {stats['budget_bytes'] / mb:.2f} MB "
        f"(peak held {stats['peak_bytes'] / mb:.2f} MB) of {stats['expert_bytes'] / mb:.2f} MB",
        file=file,
    )
    ratio = stats["read_over_used"]
    disk = stats.get("disk_bytes", stats["bytes_read"])
    aligned = (
        f" ({disk / mb:.2f} MB off the device in O_DIRECT's aligned ranges)"
        if disk != stats["bytes_read"]
        else ""
    )
    print(
        f"  hits {stats['hits']}, late {stats['late']}, misses {stats['misses']} (hit rate "
        f"{pct(stats['hit_rate'])}); prefetch accuracy {pct(stats['prefetch_accuracy'])} "
        f"({stats['prefetch_used']}/{stats['prefetch_issued']})",
        file=file,
    )
    print(
        f"  read {stats['bytes_read'] / mb:.2f} MB{aligned} for "
        f"{stats['bytes_used'] / mb:.2f} MB of experts used "
        f"({'n/a' if ratio is None else f'{ratio:.2f}x'}); waited "
        f"{stats['load_wait_s']:.3f} s for loads"
        + (" (modelled tier)" if stats["tier_modelled"] else ""),
        file=file,
    )
    if stats.get("miss_precision"):
        print(
            f"  low precision ({stats['miss_precision']}, {stats['lowprec_bytes'] / mb:.2f} MB "
            f"of copies in the budget, threshold {stats['miss_threshold']:g} x top gate): "
            f"{stats['lowprec_hits']} misses served from the copies, "
            f"{stats['bytes_saved'] / mb:.2f} MB not read",
            file=file,
        )
