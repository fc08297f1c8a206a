"""``--method compressed_experts``: keep each MoE layer's most important experts in full and
replace the others by small compressed experts fitted on calibration tokens.

He et al., "Efficiently Editing Mixture-of-Experts Models with Compressed Experts" (2025, arXiv
2503.00634): of the experts a token activates, the most important run in full and the others are
replaced by compressed experts, compact representations of the full experts (vectors there,
learnt during fine-tuning), so fewer full experts run per token. In moelab's shape (a
post-training compression that reduces parameters, ``--ratio`` = fraction of expert parameters
kept) the choice is per layer rather than per token:

* importance of an expert = the gate mass it gets on the calibration tokens, ``Σ_t g_{t,e}``
  (routing frequency × mean gate weight; the layer-level total of the paper's per-token
  "highest gate runs in full");
* the ``K`` most important stay full experts; the other ``C = E − K`` become compressed experts:
  a vector plus a narrow FFN of ``--ce-width`` hidden units (0: the paper's vector alone),
  fitted by weighted least squares to the replaced expert's outputs on the tokens routed to it
  (:mod:`moelab.compress.compressed_experts_fit`; closed form: the exact optimum for the kept
  units, deterministic, no learning rate);
* the router is unchanged up to the order of its experts (full ones first): every token still
  chooses among all ``E`` experts with the same gates, and a ReLU router's sparsity target
  ``1 − k/E`` is unchanged. The model is ``model.ffn.compressed_experts = C`` and
  ``model.ffn.compressed_width = r`` (:class:`~moelab.layers.compressed_experts.
  PartlyCompressedExperts`), so the written run reloads, evaluates, generates and trains.

``C`` is the largest number of compressed experts that keeps at least ``--ratio`` of the routed
experts' parameters. Every layer is fitted on its inputs in the unchanged model (layer-wise, as
``reconstruction``).
"""

from __future__ import annotations

import argparse
import copy
import math
from typing import Any

import torch

from moelab.compress.compressed_experts_fit import fit_stand_in, routed_tokens, stand_in_error
from moelab.compress.methods._pruning import ranked_keep
from moelab.compress.methods.base import (
    Calibration,
    CompressMethod,
    CompressOutcome,
    layer_changes,
    register_method,
)
from moelab.compress.prune import build_model, config_with_ffn, moe_blocks, sliced_layer_state
from moelab.layers.compressed_experts import PartlyCompressedExperts
from moelab.layers.moe import MoE
from moelab.model import ModelConfig, TransformerLM
from moelab.model.ffn_base import ffn_params
from moelab.model.ffn_configs import MoEConfig


@register_method
class CompressedExperts(CompressMethod):
    name = "compressed_experts"
    summary = (
        "keep each layer's most important experts (gate mass) in full, replace the others by "
        "compressed experts (a vector + narrow FFN) fitted by least squares (He et al. 2025)"
    )
    capability = "prunable"

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        parser.add_argument(
            "--ce-width",
            type=int,
            default=None,
            help="compressed_experts: hidden units of each compressed expert's narrow FFN (0: a "
            "vector only, as the paper; default: 1/8 of an expert's width)",
        )

    def __init__(self, ratio: float | None, options: dict[str, Any]) -> None:
        super().__init__(ratio, options)
        self.require_ratio()
        width = self.options["ce_width"]
        if width is not None and (isinstance(width, bool) or not isinstance(width, int)):
            raise ValueError(f"--ce-width: must be an integer >= 0, got {width!r}")

    def plan(self, model: TransformerLM) -> tuple[int, int]:
        """``(compressed experts per layer, their width)`` for this model and ratio; refuses a
        model or ratio that cannot be compressed (one line naming the option)."""
        ffn = model.cfg.ffn
        if not isinstance(ffn, MoEConfig) or not moe_blocks(model):
            raise ValueError("model.ffn.kind: method 'compressed_experts' needs MoE layers ('moe')")
        if ffn.iterations != 1:
            raise ValueError(f"model.ffn.iterations: must be 1 to compress, got {ffn.iterations}")
        if ffn.compressed_experts:
            raise ValueError("model.ffn.compressed_experts: the model has compressed experts")
        hidden = ffn.d_hidden // ffn.granularity
        width = self.options["ce_width"]
        width = hidden // 8 if width is None else width
        if not 0 <= width < hidden:
            raise ValueError(
                f"--ce-width: must be an integer from 0 to {hidden - 1} (narrower than an "
                f"expert), got {width}"
            )
        routed = ffn.num_experts * ffn.granularity
        full = ffn_params(model.cfg.d_model, hidden, ffn.activation)
        stand_in = model.cfg.d_model + ffn_params(model.cfg.d_model, width, ffn.activation)
        # the most compressed experts that keep at least ratio·E·P parameters
        spare = round((1 - self.require_ratio()) * routed * full, 6)
        compressed = math.floor(spare / (full - stand_in))
        if compressed >= routed:
            lowest = (full + (routed - 1) * stand_in) / (routed * full)
            raise ValueError(
                f"--ratio: {self.ratio} would compress all {routed} experts of a layer; the "
                f"smallest ratio with --ce-width {width} is {math.ceil(lowest * 1e4) / 1e4:g} "
                "(one full expert)"
            )
        return compressed, width

    def check(self, model: TransformerLM) -> None:
        self.plan(model)

    @torch.no_grad()
    def apply(self, model: TransformerLM, calib: Calibration) -> CompressOutcome:
        compressed, width = self.plan(model)
        blocks = moe_blocks(model)
        routed = next(iter(blocks.values())).num_experts
        keep = routed - compressed
        tokens = routed_tokens(model, calib.batches)
        orders, details_blocks = {}, {}
        for i in blocks:
            mass = tokens[i].importance(routed)
            full_ids = ranked_keep(mass, keep)
            replaced = torch.tensor(sorted(set(range(routed)) - set(full_ids.tolist())))
            orders[i] = torch.cat([full_ids, replaced.long()])
            details_blocks[i] = {
                "full_experts": full_ids.tolist(),
                "compressed_experts": replaced.tolist(),
                "gate_mass": mass.tolist(),
                "full_share_of_gate_mass": float(
                    mass[full_ids].sum() / mass.sum().clamp_min(1e-30)
                ),
            }
        if compressed:
            new = self._compressed(model, orders, compressed, width, tokens, details_blocks)
        else:  # the ratio keeps every expert: the same model
            new = copy.deepcopy(model)
        changes = layer_changes(model, new, _full_experts)
        details = {
            "importance": "gate mass per expert on the calibration tokens (sum of gate weights)",
            "fit": "weighted least squares (vector + narrow FFN on the top units), closed form",
            "full_experts": keep,
            "compressed_experts": compressed,
            "compressed_width": width,
            "blocks": {str(i): d for i, d in details_blocks.items()},
        }
        return CompressOutcome(new, changes, details)

    def _compressed(self, model, orders, compressed, width, tokens, details_blocks):
        blocks = moe_blocks(model)
        first = next(iter(blocks))
        keep, activation = blocks[first].num_experts - compressed, model.cfg.ffn.activation
        options = blocks[first].router.pruned_options(orders[first])
        new = build_model(_config(model.cfg, compressed, width, options))
        state = model.state_dict()
        for i, moe in blocks.items():
            prefix = f"blocks.{i}.ffn."
            state = {k: v for k, v in state.items() if not k.startswith(prefix)}
            layer, errors = _layer_state(moe, orders[i], keep, width, activation, tokens[i])
            state |= {prefix + k: v for k, v in layer.items()}
            details_blocks[i] |= errors
        new.load_state_dict(state)
        return new.train(model.training)


def _layer_state(moe, order, keep, width, activation, tokens) -> tuple[dict, dict]:
    """The compressed layer's state (full experts first, then the fitted stand-ins, the router
    permuted alike) and the replaced experts' output error on the calibration tokens
    (``Σ g²‖E(x) − s(x)‖²``), fitted vs dropped."""
    state = sliced_layer_state(moe, order)
    w13, w2 = state.pop("experts.w13_EDF2"), state.pop("experts.w2_EFD")
    state["experts.full.w13_EDF2"], state["experts.full.w2_EFD"] = w13[:keep], w2[:keep]
    fits, fitted, dropped = [], 0.0, 0.0
    for c, e in enumerate(order[keep:].tolist()):
        x, g = tokens.rows(e)
        s = fit_stand_in(w13[keep + c], w2[keep + c], activation, x, g, width)
        fits.append(s)
        fitted += stand_in_error(w13[keep + c], w2[keep + c], activation, x, g, s)
        dropped += stand_in_error(w13[keep + c], w2[keep + c], activation, x, g, None)
    state["experts.bias_CD"] = torch.stack([s.bias_D for s in fits])
    if width:
        state["experts.narrow.w13_EDF2"] = torch.stack([s.w13 for s in fits])
        state["experts.narrow.w2_EFD"] = torch.stack([s.w2 for s in fits])
    return state, {"error_compressed": fitted, "error_dropped": dropped}


def _full_experts(moe: MoE) -> int:
    """The routed experts a layer holds in full (the compressed ones are in the details)."""
    experts = moe.experts
    return experts.num_full if isinstance(experts, PartlyCompressedExperts) else moe.num_experts


def _config(cfg: ModelConfig, compressed: int, width: int, options: dict) -> ModelConfig:
    """``cfg`` with ``compressed`` stand-ins of ``width`` per layer and the router's options for
    its permuted experts (a hash router keeps its hash)."""
    fields = {"compressed_experts": compressed, "compressed_width": width}
    return config_with_ffn(cfg, fields, options)
