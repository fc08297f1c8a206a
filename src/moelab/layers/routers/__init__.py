"""The router registry and every router moelab ships.

:mod:`~moelab.layers.routers.base` holds the contract (:class:`Router`, :class:`RouterOutput`, the
registry); each other module is one routing method, registered when this package is imported.
"""

# Registration order is the order error messages and reports list routers in.
from moelab.layers.routers import topk  # isort: split

from moelab.layers.routers import relu  # isort: split

from moelab.layers.routers import hash  # isort: split

from moelab.layers.routers import expert_choice  # isort: split

from moelab.layers.routers import moepp  # isort: split

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
from moelab.layers.routers.expert_choice import ExpertChoiceRouter
from moelab.layers.routers.hash import HashRouter
from moelab.layers.routers.moepp import MoEPPRouter
from moelab.layers.routers.relu import ReLURouter
from moelab.layers.routers.topk import TopKRouter

__all__ = [
    "ROUTERS",
    "ExpertChoiceRouter",
    "HashRouter",
    "MoEPPRouter",
    "ReLURouter",
    "Router",
    "RouterOutput",
    "TopKRouter",
    "build_router",
    "check_coef",
    "expert_choice",
    "hash",
    "make_decision",
    "moepp",
    "register_router",
    "relu",
    "router_class",
    "router_options",
    "topk",
    "uniform_assignment",
]
