"""The routed MoE FFN's config (:class:`MoEConfig`): the block's options, the router's (its
option fields and ``router_options``), validation through the layer's own checks, build and
accounting (including Lory's merged experts)."""

from __future__ import annotations

import dataclasses
import math
from typing import Any, ClassVar, Literal

import torch
from torch import nn

from moelab.config import ConfigError
from moelab.layers.compressed_experts import check_compressed_experts
from moelab.layers.moe import MoE
from moelab.layers.moe_checks import check_expert_slots, check_moe_args, check_router_fits
from moelab.layers.quant_experts import check_quant_args
from moelab.layers.routers import (
    ROUTERS,
    LoryRouter,
    Router,
    build_router,
    router_class,
    router_options,
)
from moelab.model.ffn_base import (
    Activation,
    FFNSlot,
    auto_d_hidden,
    ffn_params,
    field_default,
    layer_checks,
)

Backend = Literal["auto", "loop", "fused", "bmm", "grouped_mm"]


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
STRUCTURE_FIELDS = {
    "momentum": 0.0,
    "momentum_step": 1.0,
    "iterations": 1,
    "compressed_experts": 0,
    "compressed_width": 0,
}
# Other options config.yaml shows only when set (so the files of ordinary runs do not change).
HIDDEN_AT_DEFAULT = {
    "eval_capacity_factor": None,
    "expert_slots": None,
    "expert_quant": "none",
    "expert_quant_group": 32,
    "expert_quant_keep": 0,
}
_UNSET = object()


@dataclasses.dataclass(kw_only=True)
class MoEConfig(FFNSlot):
    """A routed MoE FFN (:class:`~moelab.layers.MoE`): ``num_experts`` experts of width
    ``d_hidden`` (one coarse expert; None: automatic), ``top_k`` per token (ReLU routing: the k of
    the sparsity target 1 − k/E), ``router`` (a registered router: ``topk``, ReMoE's ``relu``, ...),
    ``granularity``, ``shared_experts``, ``capacity_factor`` (null = dropless; training only),
    ``eval_capacity_factor`` (the cap in eval and generation; null = dropless), ``backend``;
    ``momentum`` / ``momentum_step`` (MomentumSMoE's μ / γ), ``iterations`` (Chain-of-Experts),
    ``expert_slots`` (experts merged into shared weight slots by ``moelab compress``) and
    ``compressed_experts`` / ``compressed_width`` (the last routed experts are compressed
    stand-ins, written by ``moelab compress --method compressed_experts``), see
    :class:`~moelab.layers.MoE`.

    The router's options: ``balance_coef``, ``z_loss_coef``, ``renormalize``,
    ``softmax_after_topk`` (TopK), ``l1_balanced`` (ReLU) have fields here; the options of other
    routers go in ``router_options`` (``model.ffn.router_options.NAME=VALUE``). Setting an option
    the chosen router does not take is an error.

    ``expert_quant`` (``none``, ``int8``, ``int4``), ``expert_quant_group`` and
    ``expert_quant_keep``: the routed experts are stored quantized, group-wise, with that many
    experts per layer one step higher (:class:`~moelab.layers.quant_experts.QuantizedExperts`,
    written by ``moelab compress --method quantize``); such a model evaluates but does not train.
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
    capacity_factor: float | None = None  # training forwards only
    eval_capacity_factor: float | None = None  # eval / generation (null: dropless)
    momentum: float = 0.0  # MomentumSMoE's μ (0: off)
    momentum_step: float = 1.0  # MomentumSMoE's γ
    iterations: int = 1  # Chain-of-Experts passes (1: plain MoE)
    expert_slots: int | None = None  # merged experts' weight slots (null: one per routed expert)
    compressed_experts: int = 0  # the last C routed experts are compressed stand-ins
    compressed_width: int = 0  # hidden width of a compressed expert's narrow FFN (0: a vector)
    renormalize: bool = False
    softmax_after_topk: bool = False
    balance_coef: float = 0.01
    z_loss_coef: float = 0.0
    l1_balanced: bool = True
    backend: Backend = "auto"
    router_options: dict[str, Any] = dataclasses.field(default_factory=dict)
    expert_quant: Literal["none", "int8", "int4"] = "none"
    expert_quant_group: int = 32
    expert_quant_keep: int = 0

    def validate(self) -> None:
        if self.router not in ROUTERS:  # the registry's message: names and the closest match
            layer_checks(self, lambda: router_class(self.router))
        accepted = router_options(self.router)
        for name in ROUTER_OPTION_FIELDS:
            default = field_default(type(self), name)
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
        layer_checks(
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
                self.eval_capacity_factor,
            ),
        )
        with torch.device("meta"):  # the router's own checks; no memory, no random numbers
            layer_checks(self, self._meta_router)
        expert_hidden = None if self.d_hidden is None else self.d_hidden // self.granularity
        layer_checks(
            self,
            lambda: check_compressed_experts(
                self.compressed_experts,
                self.compressed_width,
                self.num_experts * self.granularity,
                expert_hidden,
            ),
        )
        layer_checks(
            self,
            lambda: check_expert_slots(
                self.expert_slots,
                self.num_experts * self.granularity,
                self.router,
                self.router_kwargs(),
            ),
        )
        layer_checks(
            self,
            lambda: check_router_fits(
                self.router,
                self.capacity_factor,
                self.iterations,
                eval_capacity_factor=self.eval_capacity_factor,
            ),
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
            and getattr(self, f.name) != HIDDEN_AT_DEFAULT.get(f.name, _UNSET)
        ]

    def router_kwargs(self) -> dict[str, Any]:
        """The options handed to the router: its option fields, then ``router_options``."""
        accepted = router_options(self.router)
        fields = {name: getattr(self, name) for name in ROUTER_OPTION_FIELDS if name in accepted}
        return fields | dict(self.router_options)

    def resolved(self, d_model: int) -> MoEConfig:
        out = self
        if self.d_hidden is None:
            out = dataclasses.replace(self, d_hidden=auto_d_hidden(d_model, self.activation))
        g = self.granularity
        layer_checks(  # the group against the real widths
            self,
            lambda: check_quant_args(
                self.expert_quant,
                self.expert_quant_group,
                self.expert_quant_keep,
                self.num_experts * g,
                d_model,
                out.d_hidden // g,
            ),
        )
        return out

    def untrainable(self) -> tuple[str, str] | None:
        """Quantized experts have no gradient: ``(field, reason)`` for the trainer's refusal."""
        if self.expert_quant == "none":
            return None
        return (
            "expert_quant",
            f"is {self.expert_quant!r}: quantized experts have no gradient, so this run "
            "evaluates, generates and is analysed but cannot train (train its source run)",
        )

    def for_seq_len(self, seq_len: int, where: str) -> MoEConfig:
        """The router's options fitted to the sequence length, where the router says how
        (its ``fit_options``: Lory derives ``segment_len`` when unset and refuses one that leaves
        a single segment per sequence)."""
        fit = getattr(router_class(self.router), "fit_options", None)
        if fit is None:
            return self
        try:
            options = fit(dict(self.router_options), seq_len, where)
        except ValueError as err:  # "NAME must ...": reported on router_options.NAME
            name, _, message = str(err).partition(" ")
            raise ConfigError(f"router_options.{name}", message) from None
        if options == self.router_options:
            return self
        return dataclasses.replace(self, router_options=options)

    def build(self, d_model: int, init_std: float) -> nn.Module:
        layer = MoE(
            d_model,
            self.d_hidden,
            self.num_experts,
            self.top_k,
            router=self.router,
            granularity=self.granularity,
            shared_experts=self.shared_experts,
            capacity_factor=self.capacity_factor,
            eval_capacity_factor=self.eval_capacity_factor,
            activation=self.activation,
            backend=self.backend,
            init_std=init_std,
            shared_gate=self.shared_gate,
            momentum=self.momentum,
            momentum_step=self.momentum_step,
            iterations=self.iterations,
            expert_slots=self.expert_slots,
            expert_quant=self.expert_quant,
            expert_quant_group=self.expert_quant_group,
            expert_quant_keep=self.expert_quant_keep,
            compressed_experts=self.compressed_experts,
            compressed_width=self.compressed_width,
            **self.router_kwargs(),
        )
        return self.counted(layer, d_model)

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
        # Merged experts (expert_slots): fewer weights; every assignment still runs one expert.
        c = self.iterations
        weights = self.num_experts * g if self.expert_slots is None else self.expert_slots
        # compressed experts: a vector and a narrow FFN each instead of a full expert; a token's
        # active count stays that of k full experts (an upper bound: what a token that picks
        # only full experts runs; the measured FLOPs count each stand-in at its own cost)
        stand_in = d_model + ffn_params(d_model, self.compressed_width, self.activation)
        routed = (weights - self.compressed_experts) * expert
        total = routed + self.compressed_experts * stand_in + c * (router - once) + shared
        active = c * (self.top_k * g * expert + router - once + shared)
        return {
            "total_params": total,
            "active_params": active,
            "matmul_active": active + c * once,
            "extra_flops": 0,
            "model_shared_params": once,
            "assignment_flops": 2 * expert,
            "assignments_per_token": c * self.top_k * g,
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
        if self.expert_quant != "none":
            name += f"+{self.expert_quant}"
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
        "assignment_flops": 2 * expert,  # the one merged expert a token runs
        "assignments_per_token": 1,
    }
