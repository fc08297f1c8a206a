"""The MoE block's argument checks, shared by :class:`~moelab.layers.MoE` and the model config
(which runs them at load time without building a layer): sizes, capacity factors, activation,
backend, MomentumSMoE and Chain-of-Experts options, and the block options a router cannot be
combined with (decided by the router's class)."""

from __future__ import annotations

import math

from moelab.layers.dense import check_activation, check_positive_int
from moelab.layers.experts import check_backend
from moelab.layers.lory import check_merging_moe
from moelab.layers.routers import require, router_class
from moelab.layers.routers.lory import LoryRouter


def check_moe_args(
    d_model: int,
    d_hidden: int,
    num_experts: int,
    top_k: int,
    granularity: int = 1,
    shared_experts: int = 0,
    capacity_factor: float | None = None,
    activation: str = "swiglu",
    backend: str = "auto",
    shared_gate: bool = False,
    momentum: float = 0.0,
    momentum_step: float = 1.0,
    iterations: int = 1,
    eval_capacity_factor: float | None = None,
) -> None:
    """The MoE block's own argument checks (the router checks its options when built); shared
    with the config, which runs them at load time without allocating a layer."""
    for name, value in (
        ("d_model", d_model),
        ("d_hidden", d_hidden),
        ("num_experts", num_experts),
        ("top_k", top_k),
        ("granularity", granularity),
    ):
        check_positive_int(name, value)
    if top_k > num_experts:
        raise ValueError(f"top_k must be <= num_experts ({num_experts}), got {top_k}")
    if d_hidden % granularity:
        raise ValueError(f"granularity must divide d_hidden ({d_hidden}), got {granularity}")
    if not isinstance(shared_experts, int) or shared_experts < 0:
        raise ValueError(f"shared_experts must be an integer >= 0, got {shared_experts!r}")
    if shared_gate and not shared_experts:
        raise ValueError("shared_gate needs shared_experts >= 1 (it gates the shared experts)")
    for name, value in (
        ("capacity_factor", capacity_factor),
        ("eval_capacity_factor", eval_capacity_factor),
    ):
        if value is not None and (not _is_number(value) or value <= 0):
            raise ValueError(
                f"{name} must be None (dropless) or a finite number > 0, got {value!r}"
            )
    check_activation(activation)
    check_backend(backend)
    if not _is_number(momentum) or not 0 <= momentum < 1:
        raise ValueError(f"momentum must be a number in [0, 1) (0: off), got {momentum!r}")
    if not _is_number(momentum_step) or not 0 < momentum_step < math.inf:
        raise ValueError(f"momentum_step must be a finite number > 0, got {momentum_step!r}")
    if not isinstance(iterations, int) or isinstance(iterations, bool) or iterations < 1:
        raise ValueError(f"iterations must be a positive integer (1: no chain), got {iterations!r}")


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def check_router_fits(
    router: str,
    capacity_factor: float | None,
    iterations: int,
    debug_uniform_routing: bool = False,
    eval_capacity_factor: float | None = None,
) -> None:
    """The block's options a router cannot be combined with; shared with the config, which runs
    it at load time (the router class decides, no router is built)."""
    cls = router_class(router)
    if getattr(cls, "sets_own_capacity", False):
        for name, value in (
            ("capacity_factor", capacity_factor),
            ("eval_capacity_factor", eval_capacity_factor),
        ):
            if value is not None:
                raise ValueError(
                    f"{name} must be None (null) with router {router!r}: it sets each "
                    "expert's capacity itself (its router option ec_capacity_factor)"
                )
    if issubclass(cls, LoryRouter):  # experts merged per segment, nothing dispatched
        check_merging_moe(capacity_factor, iterations, debug_uniform_routing)
        check_merging_moe(eval_capacity_factor, 1, False, "eval_capacity_factor")
    if iterations > 1 and cls.updates_between_steps:
        raise ValueError(
            f"iterations > 1 cannot be combined with router {router!r}: its between-step "
            "update sees the loads of one router per layer"
        )


def check_expert_slots(
    expert_slots: int | None, routed_experts: int, router: str, router_options: dict | None = None
) -> None:
    """``expert_slots`` (merged experts sharing weight slots, :mod:`moelab.compress.merging`):
    None (one slot per expert) or an integer from 1 to the routed experts, with a router that
    declares ``mergeable`` (its routing stays over all experts; only the weights are shared)."""
    if expert_slots is None:
        return
    if (
        not isinstance(expert_slots, int)
        or isinstance(expert_slots, bool)
        or not 1 <= expert_slots <= routed_experts
    ):
        raise ValueError(
            f"expert_slots must be None or an integer from 1 to the routed experts "
            f"({routed_experts}), got {expert_slots!r}"
        )
    require(router, "mergeable", router_options)
