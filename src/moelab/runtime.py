"""Process-level settings that make PyTorch on CPU markedly faster for MoE workloads.

glibc's ``malloc`` serves every allocation above its mmap threshold (at most 32 MiB) with a fresh
``mmap`` and gives it back to the kernel on ``free``. An MoE layer allocates several such buffers
per step (the ``[assignments, d_model]`` rows of the permutation: 268 MB for 4096 tokens × top-32
at d_model 512), so every step page-faults and zero-fills them again: measured on the development
CPU this was about a third of a very fine-grained layer's time. :func:`keep_freed_memory` tells
glibc to serve large blocks from its heap and keep freed memory for reuse, so the buffers of step
*n* are recycled at step *n+1*. The price is that the process's resident memory stays at its peak
(what a training process does anyway).

The ``moelab`` command line applies it at start-up; library users may call it themselves. Set
``MOELAB_SYSTEM_MALLOC=1`` to keep the system's behaviour. No-op outside glibc (macOS, musl).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

_M_TRIM_THRESHOLD = -1  # mallopt parameters from glibc's <malloc.h>
_M_MMAP_MAX = -4
_applied: bool | None = None


def keep_freed_memory() -> bool:
    """Serve large allocations from glibc's heap and keep freed memory; True if it took effect."""
    global _applied
    if _applied is not None:
        return _applied
    _applied = False
    if os.environ.get("MOELAB_SYSTEM_MALLOC", "") not in ("", "0"):
        return False
    name = ctypes.util.find_library("c")
    if not name:
        return False
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    _applied = bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))
    return _applied


def allocator_mode() -> str:
    """A short description for benchmark headers and run summaries."""
    return "glibc heap kept (moelab.runtime)" if _applied else "system default"
