"""The decoding options ``moelab generate``, ``moelab eval-decoding`` and ``moelab lm-eval``
share (MoE-aware decoding, :mod:`moelab.eval.decoding`)."""

from __future__ import annotations

import argparse
from typing import Any


def add_decoding_options(p: argparse.ArgumentParser, *, mode: bool = False) -> None:
    """The options of each mode; with ``mode``, also ``--decoding`` (the one mode to use)."""
    g = p.add_argument_group("MoE-aware decoding (docs/inference.md#moe-aware-decoding)")
    if mode:
        g.add_argument(
            "--decoding",
            default="plain",
            help="plain (default), scmoe or reroute: next-token scores",
        )
    g.add_argument("--scmoe-alpha", type=float, default=0.1, help="plausibility cut-off α")
    g.add_argument("--scmoe-beta", type=float, default=0.5, help="contrast strength β")
    g.add_argument("--scmoe-weak-rank", type=int, default=2, help="weak pass: the rank-r expert")
    g.add_argument("--reroute-steps", type=int, default=2, help="gradient steps per adaptation")
    g.add_argument("--reroute-lr", type=float, default=0.1, help="step size on the offsets")
    g.add_argument("--reroute-interval", type=int, default=16, help="adapt every N new tokens")


def decoding_options(args: argparse.Namespace) -> dict[str, Any]:
    """The keyword options of :func:`moelab.eval.decoding.make_decoder`."""
    names = ("scmoe_alpha", "scmoe_beta", "scmoe_weak_rank")
    names += ("reroute_steps", "reroute_lr", "reroute_interval")
    return {name: getattr(args, name) for name in names}
