"""Serving models larger than memory: MoE expert offloading (``moelab generate --expert-memory``).

Non-expert weights stay resident; each MoE layer's experts are read on demand from the run's
safetensors file into a cache under a measured byte budget (LRU or LFU eviction), optionally
prefetched on a background thread by the next layer's router. See docs/inference.md.

The public names load on first use, so the command line can add the options
(:mod:`moelab.serve.options`) without importing torch.
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = [
    "POLICIES",
    "TIERS",
    "ExpertCache",
    "OffloadSession",
    "check_offloadable",
    "load_offloaded",
    "offload_model",
    "parse_bytes",
    "print_stats",
]

_HOME = {
    "POLICIES": "options",
    "TIERS": "tiers",
    "parse_bytes": "tiers",
    "ExpertCache": "cache",
    "OffloadSession": "offload",
    "check_offloadable": "offloadable",
    "offload_model": "offload",
    "load_offloaded": "run",
    "print_stats": "run",
}


def __getattr__(name: str) -> Any:
    if name not in _HOME:
        raise AttributeError(f"module 'moelab.serve' has no attribute {name!r}")
    return getattr(importlib.import_module(f"moelab.serve.{_HOME[name]}"), name)
