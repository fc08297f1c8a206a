"""Compression of trained MoE models: expert pruning (:mod:`moelab.compress.prune`).

Each method takes a run and writes a new run (``moelab train --resume`` continues it), so its
result is evaluated, analysed and compared like any other run.
"""

from moelab.compress.prune import expert_usage, prune_experts, prune_run

__all__ = ["expert_usage", "prune_experts", "prune_run"]
