"""``moelab compress`` methods, one module each; importing this package registers all of them.

Every module of the package is imported (:func:`pkgutil.iter_modules`), and each method
registers itself with :func:`~moelab.compress.methods.base.register_method`: adding a method is
adding a module, and no list of method names exists anywhere. Modules whose name starts with
``_`` are helpers that several methods share, not methods.
"""

from __future__ import annotations

import importlib
import pkgutil

from moelab.compress.methods.base import (
    METHODS,
    SUITE_RATIOS,
    Calibration,
    CompressMethod,
    CompressOutcome,
    LayerChange,
    SourceRun,
    SuiteSetting,
    get_method,
    method_names,
    module_bytes,
    module_params,
    register_method,
)

__all__ = [
    "METHODS",
    "Calibration",
    "CompressMethod",
    "CompressOutcome",
    "LayerChange",
    "SUITE_RATIOS",
    "SourceRun",
    "SuiteSetting",
    "get_method",
    "method_names",
    "module_bytes",
    "module_params",
    "register_method",
]

for _info in pkgutil.iter_modules(__path__):
    if _info.name != "base" and not _info.name.startswith("_"):  # _name: helper modules
        importlib.import_module(f"{__name__}.{_info.name}")
