"""The routed layers: moelab's heart, importable without the rest of the package."""

from moelab.layers.base import (
    RoutedLayer,
    RoutingDecision,
    RoutingStats,
    collect_aux_losses,
    routed_layers,
    weighted_aux_loss,
)
from moelab.layers.dense import DenseFFN
from moelab.layers.moe import MoE
from moelab.layers.peer import PEER
from moelab.layers.pkm import PKM
from moelab.layers.sparsity import SparsityController

__all__ = [
    "DenseFFN",
    "MoE",
    "PEER",
    "PKM",
    "SparsityController",
    "RoutedLayer",
    "RoutingDecision",
    "RoutingStats",
    "collect_aux_losses",
    "routed_layers",
    "weighted_aux_loss",
]
