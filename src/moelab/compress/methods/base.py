"""The shared shape of ``moelab compress`` methods: what a method receives, what it returns, and
the registry the CLI and the driver (:mod:`moelab.compress.run`) read.

A method is one :class:`CompressMethod` subclass in its own module of this package, decorated
with :func:`register_method`; :mod:`moelab.compress.methods` imports every module of the package
(``pkgutil``), so no list of method names exists anywhere. The driver loads the source run,
builds a :class:`Calibration`, calls :meth:`CompressMethod.check` (one-line refusals before any
work) then :meth:`CompressMethod.apply`, and writes the :class:`CompressOutcome`'s model as a new
run whose provenance records the per-layer :class:`LayerChange` and the method's ``details``.

A compressed model is an ordinary :class:`~moelab.model.TransformerLM` whose ``cfg`` rebuilds it,
so ``load_run`` of the written run gives the same modules and eval, generate, analyze and
``train --resume`` work on it.
"""

from __future__ import annotations

import argparse
import difflib
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn

from moelab.compress.prune import moe_blocks

if TYPE_CHECKING:
    from moelab.layers.moe import MoE
    from moelab.model import TransformerLM
    from moelab.train.config import RunConfig

__all__ = [
    "Calibration",
    "CompressMethod",
    "CompressOutcome",
    "LayerChange",
    "METHODS",
    "SUITE_RATIOS",
    "SourceRun",
    "SuiteSetting",
    "get_method",
    "layer_changes",
    "method_names",
    "module_bytes",
    "module_params",
    "register_method",
    "routed_experts",
    "stored_experts",
]


@dataclass(frozen=True)
class Calibration:
    """Token batches a method measures the model on (no labels: next-token inputs)."""

    batches: list[torch.Tensor]  # input ids [B, T]: the run's training split, or --calib-data
    source: str  # for provenance: dataset (as provenance.source_reference names it), checksum,
    # split, number of batches
    seed: int

    @property
    def tokens(self) -> int:
        return sum(int(b.numel()) for b in self.batches)


@dataclass(frozen=True)
class LayerChange:
    """What one block's compressed layer held before and after (provenance, the CLI summary).
    ``params`` are the layer's parameters (nonzero ones where a method zeroes weights in place,
    which the method's ``details`` says); ``bytes`` what its tensors take in the weights file."""

    block: int
    experts_before: int
    experts_after: int
    params_before: int
    params_after: int
    bytes_before: int
    bytes_after: int

    def to_dict(self) -> dict[str, int]:
        return asdict(self)


# The ratios of expert parameters kept at which ``moelab compare --suite compress`` runs every
# method that takes a ratio (a method without one declares its own settings).
SUITE_RATIOS: tuple[float, ...] = (0.75, 0.5, 0.25)


@dataclass(frozen=True)
class SuiteSetting:
    """One setting the compress suite runs a method at: a short ``label`` (the table's "setting"
    column and part of the run's directory name), the ``ratio`` (None for methods without one)
    and the method's ``options`` (by ``dest``, over its defaults)."""

    label: str
    ratio: float | None
    options: dict[str, Any]


@dataclass(frozen=True)
class SourceRun:
    """The run being compressed, for a method that reads more of it than the chosen weights
    (router_change: an earlier checkpoint, or the run's step-0 init from ``config.train.seed``).
    The driver sets it as ``method.source`` before :meth:`CompressMethod.check`; Python callers
    of ``apply`` on a bare model leave it None. Read only: a source run is never modified."""

    path: Path
    checkpoint: Path  # the checkpoint whose weights ``apply`` receives
    config: RunConfig


@dataclass
class CompressOutcome:
    model: TransformerLM  # the compressed model; model.cfg describes its shape
    layers: list[LayerChange]
    details: dict[str, Any]  # JSON-able, method-specific, written into provenance


def module_params(module: nn.Module, *, nonzero: bool = False) -> int:
    """Parameters of ``module`` (each tensor once), or only the nonzero ones."""
    params = {id(p): p for p in module.parameters()}.values()
    if nonzero:
        return sum(int(torch.count_nonzero(p.detach())) for p in params)
    return sum(p.numel() for p in params)


def module_bytes(module: nn.Module) -> int:
    """Bytes of ``module``'s state (parameters and buffers, each tensor once) as stored."""
    tensors = {id(t): t for t in module.state_dict(keep_vars=True).values()}.values()
    return sum(t.numel() * t.element_size() for t in tensors)


def routed_experts(moe: MoE) -> int:
    """The layer's routed experts (what pruning keeps fewer of)."""
    return moe.num_experts


def stored_experts(moe: MoE) -> int:
    """The expert weights the layer stores (the weight slots, after merging)."""
    return moe.experts.num_experts


def layer_changes(
    model: TransformerLM,
    changed: TransformerLM,
    experts: Callable[[MoE], int] = routed_experts,
    params_after: Callable[[MoE, MoE], int] | None = None,
) -> list[LayerChange]:
    """Per MoE block of ``model``, the :class:`LayerChange` to ``changed``: its ``experts`` (by
    default the routed experts; a method counts weight slots or full experts), its parameters
    (after: ``params_after(layer, changed layer)`` where a method counts them its own way) and
    bytes."""
    after = moe_blocks(changed)
    return [
        LayerChange(
            block=i,
            experts_before=experts(moe),
            experts_after=experts(after[i]),
            params_before=module_params(moe),
            params_after=(
                module_params(after[i]) if params_after is None else params_after(moe, after[i])
            ),
            bytes_before=module_bytes(moe),
            bytes_after=module_bytes(after[i]),
        )
        for i, moe in moe_blocks(model).items()
    ]


class CompressMethod:
    """Base of every ``moelab compress --method NAME``.

    Subclasses set ``name`` (the ``--method`` value), ``summary`` (one line for ``--help`` and
    docs, citing the paper), ``needs_moe`` (the driver refuses a model without routed MoE
    layers: dense, PEER, PKM), ``capability`` (the router capability of
    :data:`~moelab.layers.routers.base.CAPABILITIES` it needs: the driver refuses other routers
    with the registry's ``require`` line before any work), ``needs_calibration`` and
    ``takes_ratio`` (False: ``--ratio`` is refused, e.g. quantization, whose options say how far
    to go). Options: :meth:`add_arguments` adds ``--flags`` (distinct from other methods'; give
    them defaults, never ``required=True``, since every method's options are on one parser; the
    CLI refuses an option of another method); ``options`` holds their parsed values by ``dest``,
    every one present (:meth:`resolve_options` fills the defaults for Python callers).
    """

    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    capability: ClassVar[str | None] = None
    needs_calibration: ClassVar[bool] = True
    takes_ratio: ClassVar[bool] = True
    needs_moe: ClassVar[bool] = True  # False: also takes models without routed MoE layers

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        """Add this method's own options (none by default)."""

    @classmethod
    def suite_settings(
        cls, model: TransformerLM, ratios: tuple[float, ...] = SUITE_RATIOS
    ) -> list[SuiteSetting]:
        """The settings ``moelab compare --suite compress`` runs this method at on ``model`` (the
        source, read only): by default each of ``ratios`` with default options. A method without
        a ratio overrides this with its own (e.g. quantize: int8 and int4), so the suite keeps no
        list of methods or settings."""
        return [SuiteSetting(f"{r:g}", r, {}) for r in ratios]

    def __init__(self, ratio: float | None, options: dict[str, Any]) -> None:
        # ratio: fraction of expert parameters KEPT, in (0, 1) (checked by the driver); None when
        # not given or the method has none
        self.ratio = ratio
        self.options = dict(options)
        self.source: SourceRun | None = None  # set by the driver (see SourceRun)

    def check(self, model: TransformerLM) -> None:
        """Refuse ``model`` (one-line ValueError naming the field/option) before any work."""

    def apply(self, model: TransformerLM, calib: Calibration) -> CompressOutcome:
        raise NotImplementedError

    # ------------------------------------------------------------------ helpers

    def require_ratio(self) -> float:
        """The ratio, or the one-line error of a method that needs one."""
        if self.ratio is None:
            raise ValueError(
                f"--ratio: method {self.name!r} needs the fraction of expert parameters to keep, "
                "a number in (0, 1)"
            )
        return self.ratio

    @classmethod
    def option_defaults(cls) -> dict[str, Any]:
        """``dest → default`` of the options :meth:`add_arguments` adds."""
        parser = argparse.ArgumentParser(add_help=False)
        cls.add_arguments(parser)
        return {a.dest: a.default for a in parser._actions}

    @classmethod
    def resolve_options(cls, options: dict[str, Any] | None) -> dict[str, Any]:
        """``options`` over the defaults; a key that is not one of this method's options is a
        one-line error listing them."""
        defaults = cls.option_defaults()
        for key in options or {}:
            if key not in defaults:
                allowed = ", ".join(defaults) or "none"
                raise ValueError(
                    f"options: {key!r} is not an option of method {cls.name!r} (its options: "
                    f"{allowed})"
                )
        return defaults | dict(options or {})


METHODS: dict[str, type[CompressMethod]] = {}


def register_method(cls: type[CompressMethod]) -> type[CompressMethod]:
    """Class decorator: make ``cls`` available as ``moelab compress --method cls.name``."""
    if not cls.name or cls.name in METHODS:
        raise ValueError(f"compress method name {cls.name!r} is empty or already registered")
    METHODS[cls.name] = cls
    return cls


def get_method(name: str) -> type[CompressMethod]:
    """The method called ``name``; the error lists the registered ones."""
    if name not in METHODS:
        close = difflib.get_close_matches(str(name), METHODS, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ValueError(
            f"--method: must be one of {', '.join(map(repr, method_names()))}, got {name!r}{hint}"
        )
    return METHODS[name]


def method_names() -> list[str]:
    """Registered method names, sorted."""
    return sorted(METHODS)
