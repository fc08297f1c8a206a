"""The router registry and every router moelab ships.

:mod:`~moelab.layers.routers.base` holds the contract (:class:`Router`, :class:`RouterOutput`,
what a router may declare, the registry), :mod:`~moelab.layers.routers.registry` its queries; each
other module is one routing method, registered when its class is imported here.
"""

# Registration order is the order error messages and reports list routers in: the two methods
# of the ReMoE paper, its other baselines, then the wider literature (docs/moe.md).
from moelab.layers.routers.topk import TopKRouter  # isort: split

from moelab.layers.routers.relu import ReLURouter  # isort: split

from moelab.layers.routers.expert_choice import ExpertChoiceRouter  # isort: split

from moelab.layers.routers.hash import HashRouter  # isort: split

from moelab.layers.routers.sparsemixer import SparseMixerRouter  # isort: split

from moelab.layers.routers.lory import LoryRouter  # isort: split

from moelab.layers.routers.top_p import TopPRouter  # isort: split

from moelab.layers.routers.null import NullExpertRouter  # isort: split

from moelab.layers.routers.moepp import MoEPPRouter  # isort: split

from moelab.layers.routers.aux_free import AuxFreeRouter  # isort: split

from moelab.layers.routers.rmoe import RecurrentRouter, share_recurrent_routers  # isort: split

from moelab.layers.routers.base import (
    CAPABILITIES,
    ROUTERS,
    Router,
    RouterOutput,
    check_coef,
    make_decision,
    register_router,
    uniform_assignment,
)
from moelab.layers.routers.registry import (
    build_router,
    require,
    router_class,
    router_options,
    routers_with,
)

__all__ = [
    "CAPABILITIES",
    "ROUTERS",
    "AuxFreeRouter",
    "ExpertChoiceRouter",
    "HashRouter",
    "LoryRouter",
    "MoEPPRouter",
    "NullExpertRouter",
    "ReLURouter",
    "RecurrentRouter",
    "Router",
    "RouterOutput",
    "SparseMixerRouter",
    "TopKRouter",
    "TopPRouter",
    "build_router",
    "check_coef",
    "make_decision",
    "register_router",
    "require",
    "router_class",
    "router_options",
    "routers_with",
    "share_recurrent_routers",
    "uniform_assignment",
]
