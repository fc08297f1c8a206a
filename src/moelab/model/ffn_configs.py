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

The kinds live in :mod:`moelab.model.ffn_base` (the shared base and ``dense``),
:mod:`moelab.model.moe_config` and :mod:`moelab.model.product_key_configs`; this module gathers
them into the tagged union.
"""

from __future__ import annotations

from moelab.model.ffn_base import (
    Activation,
    DenseConfig,
    FFNSlot,
    auto_d_hidden,
    ffn_params,
    field_default,
    layer_checks,
)
from moelab.model.moe_config import (
    ROUTER_OPTION_FIELDS,
    STRUCTURE_FIELDS,
    Backend,
    MoEConfig,
)
from moelab.model.product_key_configs import PEERActivation, PEERConfig, PEERGate, PKMConfig

__all__ = [
    "FFN_KINDS",
    "ROUTER_OPTION_FIELDS",
    "STRUCTURE_FIELDS",
    "Activation",
    "Backend",
    "DenseConfig",
    "FFNConfig",
    "FFNSlot",
    "MoEConfig",
    "PEERActivation",
    "PEERConfig",
    "PEERGate",
    "PKMConfig",
    "auto_d_hidden",
    "ffn_params",
    "field_default",
    "layer_checks",
]


FFNConfig = DenseConfig | MoEConfig | PEERConfig | PKMConfig
"""Any FFN-slot config; the ``kind`` field says which (``dense``, ``moe``, ``peer``, ``pkm``)."""

FFN_KINDS: dict[str, type[FFNSlot]] = {
    c.__dataclass_fields__["kind"].default: c
    for c in (DenseConfig, MoEConfig, PEERConfig, PKMConfig)
}
