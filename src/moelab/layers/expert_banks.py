"""Which expert bank a MoE layer holds: the float experts (one per routed expert, or fewer
shared weight slots after merging), group-wise quantized experts, or full experts followed by
compressed stand-ins - the shapes ``moelab compress`` writes - with the one-line refusals of the
combinations no method produces.

* ``expert_slots`` S (MC-SMoE, Sub-MoE: :mod:`moelab.compress.merging`): the layer holds S expert
  weights and a long ``[E·G]`` buffer ``expert_slot`` mapping each routed expert to its slot
  (filled by the merge, kept in the state dict); routing, the router's state, its losses and
  statistics stay over all E·G experts, and only the dispatcher sees slots (a token choosing two
  experts of one slot runs that slot twice, with each gate: the gates add up).
* ``expert_quant`` ``"int8"`` / ``"int4"``: :class:`~moelab.layers.quant_experts.QuantizedExperts`
  (inference only), ``expert_quant_group`` inputs per scale, ``expert_quant_keep`` experts one
  step higher (``moelab compress --method quantize``).
* ``compressed_experts`` C: the last C routed experts are compressed stand-ins, a vector plus a
  narrow FFN of width ``compressed_width`` (He et al. 2025, arXiv 2503.00634;
  :mod:`moelab.layers.compressed_experts`, ``moelab compress --method compressed_experts``).
"""

from __future__ import annotations

from moelab.layers.compressed_experts import PartlyCompressedExperts, check_compressed_experts
from moelab.layers.experts import GroupedExperts
from moelab.layers.quant_experts import QuantizedExperts, check_quant_args

ExpertBank = GroupedExperts | QuantizedExperts | PartlyCompressedExperts


def build_expert_bank(
    num_experts: int,
    d_model: int,
    expert_hidden: int,
    activation: str,
    init_std: float,
    backend: str,
    *,
    merges_experts: bool = False,
    expert_slots: int | None = None,
    expert_quant: str = "none",
    expert_quant_group: int = 32,
    expert_quant_keep: int = 0,
    compressed_experts: int = 0,
    compressed_width: int = 0,
) -> ExpertBank:
    """The bank for ``num_experts`` routed experts of width ``expert_hidden`` (ValueError naming
    the option before any weight is made)."""
    check_quant_args(
        expert_quant, expert_quant_group, expert_quant_keep, num_experts, d_model, expert_hidden
    )
    check_compressed_experts(compressed_experts, compressed_width, num_experts, expert_hidden)
    if compressed_experts and (expert_slots is not None or expert_quant != "none"):
        raise ValueError(
            "compressed_experts: cannot be combined with expert_slots or expert_quant; "
            "allowed: one of merged slots, quantized or compressed experts per model"
        )
    if compressed_experts and merges_experts:
        raise ValueError(
            "compressed_experts: cannot be combined with router 'lory' (it merges every expert)"
        )
    if expert_quant != "none" and merges_experts:
        raise ValueError(
            "expert_quant: router 'lory' merges the experts' float weights; quantized "
            "experts need a router that dispatches tokens"
        )
    if expert_quant != "none" and expert_slots is not None:
        raise ValueError(
            "expert_quant: experts merged into shared slots (expert_slots) cannot be "
            "quantized yet; allowed: expert_quant='none' with expert_slots"
        )
    stored = num_experts if expert_slots is None else expert_slots
    return (
        PartlyCompressedExperts(
            num_experts,
            compressed_experts,
            d_model,
            expert_hidden,
            compressed_width,
            activation,
            init_std,
            backend,
        )
        if compressed_experts
        else GroupedExperts(stored, d_model, expert_hidden, activation, init_std, backend)
        if expert_quant == "none"
        else QuantizedExperts(
            stored,
            d_model,
            expert_hidden,
            activation,
            expert_quant,
            expert_quant_group,
            expert_quant_keep,
        )
    )
