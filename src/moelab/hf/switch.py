"""Switching a converted model's TopK routing to another router (``convert-hf --router``).

Any router that declares ``convertible`` can take over: it receives the TopK gate's rows through
its own :meth:`~moelab.layers.routers.Router.load_gate` (state it has beyond them - null or
zero-computation experts' rows, a bias - keeps its init); every other weight is copied. Any other
router is refused before any work with the one line saying why.
"""

from __future__ import annotations

import dataclasses

from torch import Tensor, nn

from moelab.config import ConfigError
from moelab.layers.moe import MoE
from moelab.layers.routers import require, router_class
from moelab.model import TransformerLM
from moelab.model.ffn_configs import ROUTER_OPTION_FIELDS, MoEConfig

__all__ = ["check_switch_target", "switch_router", "switch_to_relu", "switched_config"]


def check_switch_target(router: str) -> None:
    router_class(router)  # an unknown name: the registry's error, which lists the routers
    try:
        require(router, "convertible")
    except ValueError as err:
        raise ValueError(f"router: {err}") from None


def _gate(moe: MoE) -> Tensor:
    """The routed experts' gate rows of ``moe``'s router (refused unless it has such a gate)."""
    try:
        require(moe.router_name, "convertible")
    except ValueError as err:
        raise ValueError(f"router: only a router with a gate can be switched: {err}") from None
    return moe.router.weight[: moe.router.num_experts].detach()


def switched_config(ffn: MoEConfig, router: str) -> MoEConfig:
    """``ffn`` routed by ``router`` instead: the same experts, E and k, the router's options at
    their defaults. Sizes the router cannot take are refused naming the field."""
    defaults = {f.name: f.default for f in dataclasses.fields(MoEConfig)}
    reset = {name: defaults[name] for name in ROUTER_OPTION_FIELDS}
    new = dataclasses.replace(ffn, router=router, router_options={}, **reset)
    try:
        new.validate()
    except ConfigError as err:
        raise err.under("model.ffn") from None
    return new


def switch_router(model: nn.Module, router: str) -> nn.Module:
    """Every routed MoE of ``model`` (a :class:`TransformerLM` or an :class:`MoE`) switched to
    ``router``: the same experts, and the old router's gate rows taken over by the new router
    (:meth:`~moelab.layers.routers.Router.load_gate`; state it has beyond them keeps its init).
    Returns a new model and leaves ``model`` unchanged (``model`` itself when it already has
    that router)."""
    check_switch_target(router)
    if isinstance(model, MoE):
        gate = _gate(model)
        if model.router_name == router:
            return model
        k, g = model.top_k // model.granularity, model.granularity
        shared = model.shared.d_hidden // model.expert_hidden if model.shared is not None else 0
        new = MoE(
            model.d_model,
            model.expert_hidden * g,
            model.num_experts // g,
            k,
            router=router,
            granularity=g,
            shared_experts=shared,
            capacity_factor=model.capacity_factor,
            eval_capacity_factor=model.eval_capacity_factor,
            activation=model.experts.activation,
            shared_gate=model.shared_gate is not None,
        )
        _load_all_but_routers(new, model.state_dict())
        new.router.load_gate(gate)
        return new
    if not isinstance(model, TransformerLM):
        raise ValueError(
            f"switch_router expects a moelab TransformerLM or MoE, got {type(model).__name__}"
        )
    cfg = model.cfg
    if not isinstance(cfg.ffn, MoEConfig):
        raise ValueError(f"model.ffn: only an MoE can switch its router, got {cfg.ffn.kind}")
    blocks = [i for i, b in enumerate(model.blocks) if isinstance(b.ffn, MoE)]
    gates = {i: _gate(model.blocks[i].ffn) for i in blocks}
    if cfg.ffn.router == router:
        return model
    new = TransformerLM(dataclasses.replace(cfg, ffn=switched_config(cfg.ffn, router)))
    _load_all_but_routers(new, model.state_dict())
    for i in blocks:
        new.blocks[i].ffn.router.load_gate(gates[i])
    return new.train(model.training)


def _load_all_but_routers(new: nn.Module, state: dict[str, Tensor]) -> None:
    """``state`` without the routers' entries into ``new``; every other entry must fit."""
    kept = {name: t for name, t in state.items() if not _of_a_router(name)}
    missing = new.load_state_dict(kept, strict=False).missing_keys
    outside = [name for name in missing if not _of_a_router(name)]
    if outside:
        raise ValueError(f"router switch: parameters with no counterpart: {outside}")


def _of_a_router(name: str) -> bool:
    parts = name.split(".")
    return "router" in parts or "chain_routers" in parts


def switch_to_relu(model: nn.Module) -> nn.Module:
    """:func:`switch_router` to ReMoE's ReLU router (same k, so the λ controller aims at
    ``1 − k/E``)."""
    return switch_router(model, "relu")
