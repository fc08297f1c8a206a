"""Which routers ``moelab export-hf`` takes: the routers' own declarations, and where they live.

Its own module because both the export (:mod:`moelab.hf.export`) and the generator of the exported
model file (:mod:`moelab.hf.gen_modeling`, which copies these routers' source) ask it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from moelab.layers.routers import ROUTERS, router_class

__all__ = ["ROUTERS_PACKAGE", "export_refusal", "exportable_routers"]

ROUTERS_PACKAGE = "moelab.layers.routers"  # the source the generated modelling file carries


def export_refusal(router: str, options: Mapping[str, Any] | None = None) -> str | None:
    """None when router ``router`` (built with ``options``; None: its defaults) can be exported,
    else one line naming it and why. The router's class decides (:meth:`Router.refusal`): it must
    be causal at inference and ``exportable``; and it must live in moelab's router package, whose
    source the generated ``modeling_moelab.py`` carries."""
    cls = router_class(router)
    for capability in ("causal_at_inference", "exportable"):
        line = cls.refusal(capability, options)
        if line is not None:
            return line
    if not cls.__module__.startswith(ROUTERS_PACKAGE + "."):
        return (
            f"router {router!r} cannot be exported to transformers: it is defined in "
            f"{cls.__module__}, outside {ROUTERS_PACKAGE}, whose source the exported "
            "modeling_moelab.py is generated from"
        )
    return None


def exportable_routers() -> list[str]:
    """The registered routers :func:`export_model` takes, in registry order."""
    return [name for name in ROUTERS if export_refusal(name) is None]
