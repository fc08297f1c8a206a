"""The routed layers: moelab's heart, importable without the rest of the package."""

from moelab.layers.base import (
    RoutedLayer,
    RoutingDecision,
    RoutingStats,
    collect_aux_losses,
    routed_layers,
    weighted_aux_loss,
)

__all__ = [
    "RoutedLayer",
    "RoutingDecision",
    "RoutingStats",
    "collect_aux_losses",
    "routed_layers",
    "weighted_aux_loss",
]
