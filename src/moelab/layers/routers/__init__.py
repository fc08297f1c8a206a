"""The router registry and every router moelab ships.

:mod:`~moelab.layers.routers.base` holds the contract (:class:`Router`, :class:`RouterOutput`, the
registry); each other module is one routing method, registered when this package is imported.
"""

# Registration order is the order error messages and reports list routers in.
from moelab.layers.routers import topk  # isort: split

from moelab.layers.routers import relu  # isort: split

from moelab.layers.routers import rmoe  # isort: split

from moelab.layers.routers import lory  # isort: split

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
from moelab.layers.routers.lory import LoryRouter
from moelab.layers.routers.relu import ReLURouter
from moelab.layers.routers.rmoe import RecurrentRouter, share_recurrent_routers
from moelab.layers.routers.topk import TopKRouter

__all__ = [
    "ROUTERS",
    "LoryRouter",
    "ReLURouter",
    "RecurrentRouter",
    "Router",
    "RouterOutput",
    "TopKRouter",
    "build_router",
    "check_coef",
    "lory",
    "make_decision",
    "register_router",
    "relu",
    "rmoe",
    "router_class",
    "router_options",
    "share_recurrent_routers",
    "topk",
    "uniform_assignment",
]
