"""The routed layers: moelab's heart, importable without the rest of the package."""

from moelab.layers.base import (
    RoutedLayer,
    RoutingContext,
    RoutingDecision,
    RoutingStats,
    collect_aux_losses,
    fixed_aux_loss,
    routed_layers,
)
from moelab.layers.dense import DenseFFN
from moelab.layers.moe import MoE
from moelab.layers.peer import PEER
from moelab.layers.pkm import PKM
from moelab.layers.router_load_hook import RouterLoadHook
from moelab.layers.routers import ROUTERS, Router, register_router
from moelab.layers.sparsity_controller import SparsityController

__all__ = [
    "DenseFFN",
    "MoE",
    "PEER",
    "PKM",
    "ROUTERS",
    "Router",
    "register_router",
    "RouterLoadHook",
    "SparsityController",
    "RoutedLayer",
    "RoutingContext",
    "RoutingDecision",
    "RoutingStats",
    "collect_aux_losses",
    "fixed_aux_loss",
    "routed_layers",
]
