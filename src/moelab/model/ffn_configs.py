"""The FFN slot's configs, one per kind: :class:`DenseConfig`, :class:`MoEConfig`,
:class:`PEERConfig`, :class:`PKMConfig` (tagged by ``kind``, the union :data:`FFNConfig`).

Each config owns its kind completely: its options and their defaults, its validation (it runs the
layer's own argument checks, so config and layer cannot disagree), :meth:`build` (the layer) and
:meth:`accounting` (its parameters and FLOPs per token). Nothing else in moelab branches on
``kind``. Presets stay short (``ffn: {kind: moe, router: relu}``) and the command line reads
``model.ffn.top_k=2``.

Accounting conventions (so numbers compare across kinds; see :mod:`moelab.model.accounting`):
``total_params`` every parameter; ``active_params`` what one token's forward touches;
``matmul_active`` the active parameters used in matmuls (2 FLOPs each); ``extra_flops`` per-token
FLOPs that are not such matmuls (product-key scoring); optionally ``model_shared_params``,
parameters that every layer of the config uses but the model holds once (RMoE's GRU): left out of
the layer's ``total_params`` and ``active_params`` (the model adds them once), kept in its
``matmul_active`` (each layer runs them). MoE counts ``top_k`` coarse experts (ReLU
routing: its target k), the router and shared experts; PEER ``heads·top_k`` singleton experts of
``2·d_model`` parameters and the query networks; PKM ``heads·top_k`` value rows. PEER shares one
set of ``2·√N`` sub-keys across heads, PKM has one per head (Lample et al. 2019).
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable
from typing import Any, ClassVar, Literal

import torch
from torch import nn

from moelab.config import Config, ConfigError
from moelab.layers.dense import DenseFFN, up_width
from moelab.layers.moe import MoE, check_moe_args, check_router_fits
from moelab.layers.peer import ACTIVATIONS as PEER_ACTIVATIONS
from moelab.layers.peer import GATES as PEER_GATES
from moelab.layers.peer import PEER
from moelab.layers.pkm import PKM
from moelab.layers.product_keys import check_product_key_args
from moelab.layers.routers import (
    ROUTERS,
    LoryRouter,
    Router,
    build_router,
    router_class,
    router_options,
)

Activation = Literal["swiglu", "gelu", "relu", "silu"]
Backend = Literal["auto", "loop", "fused", "bmm", "grouped_mm"]
PEERActivation = Literal[PEER_ACTIVATIONS]  # type: ignore[valid-type]
PEERGate = Literal[PEER_GATES]  # type: ignore[valid-type]


def auto_d_hidden(d_model: int, activation: str) -> int:
    """LLaMA's FFN width: ``8/3·d_model`` for SwiGLU (same parameters as a ``4·d_model`` GELU MLP),
    rounded up to a multiple of 64 (8 for models narrower than 256); ``4·d_model`` otherwise."""
    if activation != "swiglu":
        return 4 * d_model
    multiple = 64 if d_model >= 256 else 8
    return multiple * math.ceil(8 * d_model / 3 / multiple)


def ffn_params(d_model: int, d_hidden: int, activation: str) -> int:
    """One (bias-free) FFN: fused up/gate ``[D, up]`` and down ``[F, D]``."""
    return d_model * up_width(d_hidden, activation) + d_hidden * d_model


def _layer_checks(config: Config, run: Callable[[], Any]) -> None:
    """Run a layer's argument checks; a ``ValueError("name must ...")`` about one of ``config``'s
    fields becomes a :class:`ConfigError` on that field."""
    try:
        run()
    except ValueError as err:
        text = str(err)
        match = re.match(r"(\w+) (.*)", text, re.S)
        names = {f.name for f in dataclasses.fields(config)}
        if match and match.group(1) in names:
            raise ConfigError(match.group(1), match.group(2)) from None
        raise ConfigError("", text) from None


@dataclasses.dataclass(kw_only=True)
class _FFNSlot(Config):
    """What every FFN-slot config provides."""

    layer_type: ClassVar[str]  # the row of the accounting table
    null_means_default: ClassVar[tuple[str, ...]] = ("activation", "num_experts", "top_k")

    def resolved(self, d_model: int) -> _FFNSlot:
        """This config with automatic values (``None``) filled in for a model of width D."""
        return self

    def build(self, d_model: int, init_std: float) -> nn.Module:
        raise NotImplementedError

    def accounting(self, d_model: int) -> dict[str, int]:
        """``total_params``, ``active_params``, ``matmul_active``, ``extra_flops`` of one layer of
        this (resolved) config, and ``model_shared_params`` where some of its parameters are held
        once per model (absent: 0; see the module docstring)."""
        raise NotImplementedError

    @property
    def method(self) -> str:
        """Short name of the method, used in run names and reports."""
        return self.kind

    @property
    def sparsity_target(self) -> float | None:
        """The target of the λ controller for this layer (None: the layer has none)."""
        return None


@dataclasses.dataclass(kw_only=True)
class DenseConfig(_FFNSlot):
    """A dense FFN of width ``d_hidden`` (None: :func:`auto_d_hidden`)."""

    layer_type: ClassVar[str] = "dense_ffn"
    kind: Literal["dense"] = "dense"
    d_hidden: int | None = None
    activation: Activation = "swiglu"

    def validate(self) -> None:
        dh = self.d_hidden
        if dh is not None and dh <= 0:
            raise ConfigError("d_hidden", f"must be a positive integer or null, got {dh}")

    def resolved(self, d_model: int) -> DenseConfig:
        if self.d_hidden is not None:
            return self
        return dataclasses.replace(self, d_hidden=auto_d_hidden(d_model, self.activation))

    def build(self, d_model: int, init_std: float) -> nn.Module:
        return DenseFFN(d_model, self.d_hidden, self.activation, init_std=init_std)

    def accounting(self, d_model: int) -> dict[str, int]:
        p = ffn_params(d_model, self.d_hidden, self.activation)
        return {"total_params": p, "active_params": p, "matmul_active": p, "extra_flops": 0}


# Router options with a field of their own on MoEConfig (any other goes in ``router_options``).
ROUTER_OPTION_FIELDS = (
    "renormalize",
    "softmax_after_topk",
    "balance_coef",
    "z_loss_coef",
    "l1_balanced",
)


# MoE options that change the layer's structure, with their "off" values (config.yaml shows them
# only when set).
STRUCTURE_FIELDS = {"momentum": 0.0, "momentum_step": 1.0, "iterations": 1}
_UNSET = object()


@dataclasses.dataclass(kw_only=True)
class MoEConfig(_FFNSlot):
    """A routed MoE FFN (:class:`~moelab.layers.MoE`): ``num_experts`` experts of width
    ``d_hidden`` (one coarse expert; None: automatic), ``top_k`` per token (ReLU routing: the k of
    the sparsity target 1 − k/E), ``router`` (a registered router: ``topk``, ReMoE's ``relu``, ...),
    ``granularity``, ``shared_experts``, ``capacity_factor`` (null = dropless), ``backend``;
    ``momentum`` / ``momentum_step`` (MomentumSMoE's μ / γ) and ``iterations`` (Chain-of-Experts),
    see :class:`~moelab.layers.MoE`.

    The router's options: ``balance_coef``, ``z_loss_coef``, ``renormalize``,
    ``softmax_after_topk`` (TopK), ``l1_balanced`` (ReLU) have fields here; the options of other
    routers go in ``router_options`` (``model.ffn.router_options.NAME=VALUE``). Setting an option
    the chosen router does not take is an error.
    """

    layer_type: ClassVar[str] = "moe"
    kind: Literal["moe"] = "moe"
    d_hidden: int | None = None
    activation: Activation = "swiglu"
    num_experts: int = 8  # ReMoE's E=8, k=1
    top_k: int = 1
    router: str = "topk"
    granularity: int = 1
    shared_experts: int = 0
    shared_gate: bool = False  # sigmoid gate on the shared experts (Qwen2-MoE)
    capacity_factor: float | None = None
    momentum: float = 0.0  # MomentumSMoE's μ (0: off)
    momentum_step: float = 1.0  # MomentumSMoE's γ
    iterations: int = 1  # Chain-of-Experts passes (1: plain MoE)
    renormalize: bool = False
    softmax_after_topk: bool = False
    balance_coef: float = 0.01
    z_loss_coef: float = 0.0
    l1_balanced: bool = True
    backend: Backend = "auto"
    router_options: dict[str, Any] = dataclasses.field(default_factory=dict)

    def validate(self) -> None:
        if self.router not in ROUTERS:  # the registry's message: names and the closest match
            _layer_checks(self, lambda: router_class(self.router))
        accepted = router_options(self.router)
        for name in ROUTER_OPTION_FIELDS:
            default = _field_default(type(self), name)
            if name not in accepted and getattr(self, name) != default:
                readers = [r for r in ROUTERS if name in router_options(r)]
                raise ConfigError(
                    name,
                    f"is not an option of router {self.router!r} (it is read by: "
                    f"{', '.join(readers)}); leave it at {default!r}",
                )
        for name in self.router_options:
            if name in ROUTER_OPTION_FIELDS:
                raise ConfigError(f"router_options.{name}", f"set it as model.ffn.{name} instead")
        d_hidden = self.d_hidden if self.d_hidden is not None else self.granularity
        _layer_checks(
            self,
            lambda: check_moe_args(
                1,
                d_hidden,
                self.num_experts,
                self.top_k,
                self.granularity,
                self.shared_experts,
                self.capacity_factor,
                self.activation,
                self.backend,
                self.shared_gate,
                self.momentum,
                self.momentum_step,
                self.iterations,
            ),
        )
        with torch.device("meta"):  # the router's own checks; no memory, no random numbers
            _layer_checks(self, self._meta_router)
        _layer_checks(
            self,
            lambda: check_router_fits(self.router, self.capacity_factor, self.iterations),
        )

    def dict_fields(self) -> list[str]:
        """What a run's config.yaml shows: the chosen router's options only."""
        accepted = router_options(self.router)
        return [
            f.name
            for f in dataclasses.fields(self)
            if (f.name not in ROUTER_OPTION_FIELDS or f.name in accepted)
            and (f.name != "router_options" or self.router_options)
            and (f.name != "shared_gate" or self.shared_gate)
            and getattr(self, f.name) != STRUCTURE_FIELDS.get(f.name, _UNSET)
        ]

    def router_kwargs(self) -> dict[str, Any]:
        """The options handed to the router: its option fields, then ``router_options``."""
        accepted = router_options(self.router)
        fields = {name: getattr(self, name) for name in ROUTER_OPTION_FIELDS if name in accepted}
        return fields | dict(self.router_options)

    def resolved(self, d_model: int) -> MoEConfig:
        if self.d_hidden is not None:
            return self
        return dataclasses.replace(self, d_hidden=auto_d_hidden(d_model, self.activation))

    def build(self, d_model: int, init_std: float) -> nn.Module:
        return MoE(
            d_model,
            self.d_hidden,
            self.num_experts,
            self.top_k,
            router=self.router,
            granularity=self.granularity,
            shared_experts=self.shared_experts,
            capacity_factor=self.capacity_factor,
            activation=self.activation,
            backend=self.backend,
            init_std=init_std,
            shared_gate=self.shared_gate,
            momentum=self.momentum,
            momentum_step=self.momentum_step,
            iterations=self.iterations,
            **self.router_kwargs(),
        )

    def accounting(self, d_model: int) -> dict[str, int]:
        g = self.granularity
        width = self.d_hidden // g
        expert = ffn_params(d_model, width, self.activation)
        with torch.device("meta"):  # the router's own parameters (RMoE: projector, GRU, gate)
            meta_router = self._meta_router(d_model)
            router = sum(p.numel() for p in meta_router.parameters())
            # held once per model (RMoE's GRU), used by every router of every layer
            once = sum(p.numel() for p in meta_router.model_shared_parameters())
        shared = (
            ffn_params(d_model, self.shared_experts * width, self.activation)
            if self.shared_experts
            else 0
        ) + (d_model if self.shared_gate else 0)
        if isinstance(meta_router, LoryRouter):
            return _merging_accounting(
                d_model, self.num_experts * g, expert, router, shared, meta_router.segment_len
            )
        # Chain-of-Experts: a router per iteration, and every iteration runs k experts + shared.
        # The model-shared router parameters are counted by the model, once; each router runs them.
        c = self.iterations
        total = self.num_experts * g * expert + c * (router - once) + shared
        active = c * (self.top_k * g * expert + router - once + shared)
        return {
            "total_params": total,
            "active_params": active,
            "matmul_active": active + c * once,
            "extra_flops": 0,
            "model_shared_params": once,
        }

    @property
    def method(self) -> str:
        """The router's method, with the layer variants that change what it computes:
        ``+momentum`` (MomentumSMoE) and ``+chain<C>`` (Chain-of-Experts)."""
        name = ROUTERS[self.router].method
        if self.momentum:
            name += "+momentum"
        if self.iterations > 1:
            name += f"+chain{self.iterations}"
        return name

    @property
    def sparsity_target(self) -> float | None:
        with torch.device("meta"):  # asks the router itself; no memory, no random numbers
            return self._meta_router().sparsity_target

    def _meta_router(self, d_model: int = 1) -> Router:
        return build_router(
            self.router,
            d_model,
            self.num_experts * self.granularity,
            self.top_k * self.granularity,
            1.0,
            **self.router_kwargs(),
        )


def _merging_accounting(
    d_model: int, num_experts: int, expert: int, router: int, shared: int, segment_len: int
) -> dict[str, int]:
    """Lory (experts merged per segment): a token runs ONE expert-sized FFN (the paper's
    "active" parameters: the merged expert, plus the router); once per segment of ``T`` tokens
    the ``E`` experts are merged (``2·E`` FLOPs per expert parameter) and the router reads the
    segment mean (``2·E·D``), amortised over ``T``; the mean itself costs ``D`` adds per token."""
    merge_flops = 2 * num_experts * expert + 2 * router
    return {
        "total_params": num_experts * expert + router + shared,
        "active_params": expert + router + shared,
        "matmul_active": expert + shared,
        "extra_flops": d_model + math.ceil(merge_flops / segment_len),
    }


@dataclasses.dataclass(kw_only=True)
class _ProductKeyConfig(_FFNSlot):
    """Options shared by PEER and PKM."""

    keys_field: ClassVar[str]
    heads: int = 8
    d_key: int = 128
    query_batchnorm: bool = True

    def validate(self) -> None:
        _layer_checks(
            self,
            lambda: check_product_key_args(
                num_keys=getattr(self, self.keys_field),
                top_k=self.top_k,
                d_key=self.d_key,
                heads=self.heads,
                keys_name=self.keys_field,
            ),
        )

    def _product_key_accounting(self, d_model: int, keys: int, row_params: int) -> dict[str, int]:
        n = getattr(self, self.keys_field)
        h, k, dk = self.heads, self.top_k, self.d_key
        queries = h * d_model * dk
        bn = 2 * h * dk if self.query_batchnorm else 0
        experts_active = h * k * row_params
        return {
            "total_params": n * row_params + queries + bn + keys,
            "active_params": experts_active + queries + bn,
            "matmul_active": experts_active + queries,
            "extra_flops": h * (2 * math.isqrt(n) * dk + k * k),
        }


@dataclasses.dataclass(kw_only=True)
class PEERConfig(_ProductKeyConfig):
    """PEER (:class:`~moelab.layers.PEER`): ``num_experts`` single-neuron experts (a perfect
    square), ``heads`` retrieval heads of ``top_k`` experts each, ``d_key``, ``query_batchnorm``,
    ``activation`` and ``gate`` of the experts. Initialised with the model's ``init_std``."""

    layer_type: ClassVar[str] = "peer"
    keys_field: ClassVar[str] = "num_experts"
    kind: Literal["peer"] = "peer"
    num_experts: int = 1024**2
    top_k: int = 16
    activation: PEERActivation = "relu"
    gate: PEERGate = "softmax"

    def build(self, d_model: int, init_std: float) -> nn.Module:
        return PEER(
            d_model,
            num_experts=self.num_experts,
            heads=self.heads,
            top_k=self.top_k,
            d_key=self.d_key,
            query_batchnorm=self.query_batchnorm,
            activation=self.activation,
            gate=self.gate,
            init_std=init_std,
        )

    def accounting(self, d_model: int) -> dict[str, int]:
        keys = math.isqrt(self.num_experts) * self.d_key  # 2 halves x √N x d_key/2, shared
        return self._product_key_accounting(d_model, keys, 2 * d_model)


@dataclasses.dataclass(kw_only=True)
class PKMConfig(_ProductKeyConfig):
    """Product-key memory (:class:`~moelab.layers.PKM`): ``num_memories`` value rows (a perfect
    square), ``heads``, ``top_k``, ``d_key``, ``query_batchnorm``. ``init_std`` of the values:
    null keeps Lample et al.'s ``d_model^-1/2`` (the model's ``init_std`` is not used)."""

    layer_type: ClassVar[str] = "pkm"
    keys_field: ClassVar[str] = "num_memories"
    kind: Literal["pkm"] = "pkm"
    num_memories: int = 1024**2
    top_k: int = 32
    init_std: float | None = None

    def validate(self) -> None:
        super().validate()
        if self.init_std is not None and not self.init_std > 0:
            raise ConfigError("init_std", f"must be > 0 or null, got {self.init_std}")

    def build(self, d_model: int, init_std: float) -> nn.Module:
        return PKM(
            d_model,
            num_memories=self.num_memories,
            heads=self.heads,
            top_k=self.top_k,
            d_key=self.d_key,
            query_batchnorm=self.query_batchnorm,
            init_std=self.init_std,
        )

    def accounting(self, d_model: int) -> dict[str, int]:
        keys = self.heads * math.isqrt(self.num_memories) * self.d_key  # one set per head
        return self._product_key_accounting(d_model, keys, d_model)


FFNConfig = DenseConfig | MoEConfig | PEERConfig | PKMConfig
"""Any FFN-slot config; the ``kind`` field says which (``dense``, ``moe``, ``peer``, ``pkm``)."""

FFN_KINDS: dict[str, type[_FFNSlot]] = {
    c.__dataclass_fields__["kind"].default: c
    for c in (DenseConfig, MoEConfig, PEERConfig, PKMConfig)
}


def _field_default(cls: type, name: str) -> Any:
    f = cls.__dataclass_fields__[name]
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
