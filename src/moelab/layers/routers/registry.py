"""Looking routers up by name: the registry's queries (:data:`~moelab.layers.routers.base.ROUTERS`
is filled by :func:`~moelab.layers.routers.base.register_router`), building one from its options,
and the doors' questions - which routers have a capability, and the one-line refusal of one that
lacks it.
"""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Mapping
from typing import Any

from moelab.layers.routers.base import ROUTERS, Router, check_capability


def router_class(name: str) -> type[Router]:
    """The registered router called ``name``; the error lists the registered ones."""
    if name not in ROUTERS:
        close = difflib.get_close_matches(str(name), ROUTERS, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        choices = ", ".join(repr(n) for n in ROUTERS)
        raise ValueError(f"router must be one of {choices}, got {name!r}{hint}")
    return ROUTERS[name]


def routers_with(capability: str) -> list[str]:
    """Registered routers whose class declares ``capability`` (registration order)."""
    check_capability(capability)
    return [name for name, cls in ROUTERS.items() if getattr(cls, capability)]


def require(name: str, capability: str, options: Mapping[str, Any] | None = None) -> None:
    """Refuse router ``name`` (with ``options``) for a door that needs ``capability``: a
    ValueError whose one line names the router, the capability it lacks and why, and the
    routers that have it. Call it before any work."""
    line = router_class(name).refusal(capability, options)
    if line is not None:
        raise ValueError(f"{line} (routers that can: {', '.join(routers_with(capability))})")


def router_options(name: str) -> dict[str, Any]:
    """Options of router ``name``: its keyword-only constructor arguments and their defaults
    (``init_std`` excluded: it comes from the model)."""
    params = inspect.signature(router_class(name)).parameters.values()
    return {
        p.name: p.default
        for p in params
        if p.kind is inspect.Parameter.KEYWORD_ONLY and p.name != "init_std"
    }


def build_router(
    name: str, d_model: int, num_experts: int, top_k: int, init_std: float, **options: Any
) -> Router:
    """Construct router ``name``; an option it does not take is an error naming its options."""
    allowed = router_options(name)
    for key in options:
        if key not in allowed:
            close = difflib.get_close_matches(key, allowed, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ValueError(
                f"router {name!r} has no option {key!r}{hint}; its options: {', '.join(allowed)}"
            )
    return router_class(name)(d_model, num_experts, top_k, init_std=init_std, **options)
