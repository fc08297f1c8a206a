"""The router registry and every router moelab ships.

:mod:`~moelab.layers.routers.base` holds the contract (:class:`Router`, :class:`RouterOutput`, the
registry); each other module is one routing method, registered when this package is imported.
"""

# Registration order is the order error messages and reports list routers in: the two methods
# of the ReMoE paper first, then the literature (docs/moe.md, "Routers from the literature").
from moelab.layers.routers import topk  # isort: split

from moelab.layers.routers import relu  # isort: split

from moelab.layers.routers import sparsemixer  # isort: split

from moelab.layers.routers import top_p  # isort: split

from moelab.layers.routers import null  # isort: split

from moelab.layers.routers import aux_free  # isort: split

from moelab.layers.routers import rmoe  # isort: split

from moelab.layers.routers.aux_free import AuxFreeRouter
from moelab.layers.routers.base import (
    ROUTERS,
    Router,
    RouterOutput,
    build_router,
    check_coef,
    make_decision,
    register_router,
    router_class,
    router_options,
    uniform_assignment,
)
from moelab.layers.routers.null import NullExpertRouter
from moelab.layers.routers.relu import ReLURouter
from moelab.layers.routers.rmoe import RecurrentRouter, share_recurrent_routers
from moelab.layers.routers.sparsemixer import SparseMixerRouter
from moelab.layers.routers.top_p import TopPRouter
from moelab.layers.routers.topk import TopKRouter

__all__ = [
    "ROUTERS",
    "AuxFreeRouter",
    "NullExpertRouter",
    "ReLURouter",
    "RecurrentRouter",
    "Router",
    "RouterOutput",
    "SparseMixerRouter",
    "TopKRouter",
    "TopPRouter",
    "aux_free",
    "build_router",
    "check_coef",
    "make_decision",
    "null",
    "register_router",
    "relu",
    "rmoe",
    "router_class",
    "router_options",
    "share_recurrent_routers",
    "sparsemixer",
    "top_p",
    "topk",
    "uniform_assignment",
]
