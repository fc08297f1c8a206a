"""Compression of trained MoE models: ``moelab compress`` (:func:`compress_run`, the methods of
:mod:`moelab.compress.methods`) and its expert-pruning short name ``moelab prune``
(:func:`prune_run`, :mod:`moelab.compress.prune`).

Each method takes a run and writes a new run (``moelab train --resume`` continues it), so its
result is evaluated, analysed and compared like any other run.
"""

from moelab.compress.prune import expert_usage, prune_experts
from moelab.compress.run import compress_run, prune_run

__all__ = ["compress_run", "expert_usage", "prune_experts", "prune_run"]
