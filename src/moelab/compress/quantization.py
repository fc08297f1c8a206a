"""Post-training quantization of routed experts, expert-aware (EAQuant's parts that apply).

:func:`quantize_model` returns a copy of a model whose MoE blocks hold
:class:`~moelab.layers.quant_experts.QuantizedExperts` (int8 or int4, group-wise, see
:mod:`moelab.layers.quant_formats`); its config says so (``model.ffn.expert_quant``...), so the
written run reloads as such. What EAQuant (Fu et al. 2025, "EAQuant: Enhancing Post-Training
Quantization for MoE Models via Expert-Aware Optimization") proposes and applies to weight-only
quantization:

* the router stays at full precision (only ``experts.*`` is quantized; shared experts too stay
  float);
* experts are not equal: the ``keep`` most-used experts of each layer (routing frequency on the
  calibration tokens, :func:`~moelab.compress.prune.expert_usage`) are held one step higher
  (int8 beside int4, float32 beside int8);
* router-aware calibration: each group's scale covers a clipped range ``α·[min, max]``, ``α``
  chosen per (output row, group) from :data:`CLIP_RATIOS` to minimise the output error on the
  tokens routed to that expert, each weighted by its gate (the expert's output enters the layer's
  output multiplied by it): ``Σ_t g_t² (x_t,grp · Δw_grp)²``, from a per-expert, per-group Gram
  matrix ``H = Σ_t g_t² x x^T`` (:func:`routed_grams`). The down projection's inputs are the
  float expert's hidden activations. EAQuant's smoothing and router-logit alignment target
  activation quantization, which weight-only int8/int4 does not do, so they are not here.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

from moelab.compress.prune import (
    build_model,
    calibration_forwards,
    expert_usage,
    kept_experts,
    moe_blocks,
)
from moelab.layers.dense import activate
from moelab.layers.moe import MoE
from moelab.layers.quant_experts import QuantizedExperts, check_quant_args
from moelab.layers.quant_formats import BANKS, HIGHER
from moelab.model import ModelConfig, TransformerLM

__all__ = [
    "CLIP_RATIOS",
    "best_clips",
    "check_quantizable",
    "quantize_model",
    "routed_grams",
    "weighted_error",
]

CLIP_RATIOS = tuple(1.0 - 0.05 * i for i in range(11))  # 1.0 (no clipping) down to 0.5
_BITS = {8: "int8", 4: "int4"}


def quant_format(bits: int) -> str:
    """``8`` → ``"int8"``, ``4`` → ``"int4"``; any other width is refused with the allowed ones."""
    if bits not in _BITS or isinstance(bits, bool):
        raise ValueError(f"--bits: must be one of {', '.join(map(str, _BITS))}, got {bits!r}")
    return _BITS[bits]


def check_quantizable(model: TransformerLM, fmt: str, group: int, keep: int) -> None:
    """One-line refusals, naming the option and the allowed values, before any work."""
    blocks = moe_blocks(model)
    if not blocks:
        raise ValueError("model: no MoE layer to quantize (model.ffn.kind must be 'moe')")
    ffn = model.cfg.ffn
    if ffn.expert_quant != "none":
        raise ValueError(f"model.ffn.expert_quant: the experts are already {ffn.expert_quant!r}")
    moe = next(iter(blocks.values()))
    if moe.merges_experts:
        raise ValueError(
            "model.ffn.router: 'lory' merges the experts' float weights; quantization needs a "
            "router that dispatches tokens"
        )
    try:
        check_quant_args(fmt, group, keep, moe.num_experts, moe.d_model, moe.expert_hidden)
    except ValueError as err:
        option = {"expert_quant_group": "--quant-group", "expert_quant_keep": "--keep-high"}
        name, _, rest = str(err).partition(" ")
        raise ValueError(f"{option.get(name, name)}: {rest}") from None


@torch.no_grad()
def routed_grams(
    model: TransformerLM, batches: Iterable[Tensor], group: int
) -> dict[int, dict[str, Tensor]]:
    """Per MoE block, ``{"w13": [E, D/g, g, g], "w2": [E, F/g, g, g]}``: for each expert and input
    group, ``Σ_t g_t² x_t x_t^T`` over the tokens routed to it (``g_t`` their gates), of the
    expert's inputs (``w13``) and its float hidden activations (``w2``)."""
    blocks = moe_blocks(model)
    grams: dict[int, dict[str, Tensor]] = {}
    for i, moe in blocks.items():
        e, d, f = moe.num_experts, moe.d_model, moe.expert_hidden
        grams[i] = {
            "w13": torch.zeros(e, d // group, group, group),
            "w2": torch.zeros(e, f // group, group, group),
        }

    def observe(layer: MoE, decision: Any, x_TD: Tensor) -> None:
        g = grams[index[id(layer)]]
        experts = layer.experts
        for e in range(layer.num_experts):
            pick = decision.expert_idx_N == e
            if not bool(pick.any()):
                continue
            gate = decision.weight_N[pick].float()[:, None]
            x = x_TD[decision.token_idx_N[pick]].float()
            h = activate(x @ experts.w13_EDF2[e].float(), experts.activation)
            for name, rows in (("w13", x * gate), ("w2", h * gate)):
                r = rows.view(rows.shape[0], -1, group)
                g[name][e] += torch.einsum("tgi,tgj->gij", r, r)

    index = {id(moe): i for i, moe in blocks.items()}
    calibration_forwards(model, batches, observers=dict.fromkeys(blocks, observe))
    return grams


def weighted_error(delta_KN: Tensor, gram_GKK: Tensor) -> Tensor:
    """``[N, G]``: ``Δw_grp^T H_grp Δw_grp`` per output row and input group (``Δw`` ``[K, N]``)."""
    n_groups, group = gram_GKK.shape[:2]
    d = delta_KN.t().reshape(delta_KN.shape[1], n_groups, group)
    return torch.einsum("ngi,gij,ngj->ng", d, gram_GKK, d)


def best_clips(fmt: str, group: int, w_KN: Tensor, gram_GKK: Tensor) -> tuple[Tensor, Tensor]:
    """``(clip_NG, error_RNG)``: the ratio of :data:`CLIP_RATIOS` with the least gate-weighted
    output error per (output row, group), and every ratio's error (row 0: no clipping)."""
    k, n = w_KN.shape
    bank = BANKS[fmt](1, {"w": (n, k)}, group)
    errors = []
    for ratio in CLIP_RATIOS:
        bank.set_(0, "w", w_KN, torch.full((n, k // group), ratio))
        errors.append(weighted_error(bank.dequantized(0, "w") - w_KN.float(), gram_GKK))
    error_RNG = torch.stack(errors)
    ratios = torch.tensor(CLIP_RATIOS, dtype=torch.float32)
    return ratios[error_RNG.argmin(0)], error_RNG


def _quantized_config(cfg: ModelConfig, fmt: str, group: int, keep: int) -> ModelConfig:
    ffn = dataclasses.replace(
        cfg.ffn, expert_quant=fmt, expert_quant_group=group, expert_quant_keep=keep
    )
    return dataclasses.replace(cfg, ffn=ffn)


@torch.no_grad()
def quantize_model(
    model: TransformerLM,
    bits: int,
    group: int = 32,
    keep: int = 0,
    batches: list[Tensor] | None = None,
    clip_search: bool = True,
) -> tuple[TransformerLM, dict[str, Any]]:
    """A copy of ``model`` with its routed experts quantized to ``bits`` (8 or 4), ``group``
    inputs per scale, each layer's ``keep`` most-used experts on ``batches`` one step higher, and
    (``clip_search``) gate-weighted clipping chosen on ``batches``. Returns it and the details for
    provenance: the kept experts per block and the clip search's error before and after."""
    fmt = quant_format(bits)
    check_quantizable(model, fmt, group, keep)
    batches = list(batches or [])
    if (keep or clip_search) and not batches:
        raise ValueError("calibration: --keep-high and --clip-search need calibration batches")
    usage = expert_usage(model, batches) if keep else {}
    grams = routed_grams(model, batches, group) if clip_search else {}
    quantized = build_model(_quantized_config(model.cfg, fmt, group, keep))
    state = {k: v for k, v in model.state_dict().items() if ".experts." not in k}
    missing = quantized.load_state_dict(state, strict=False).missing_keys
    blocks = moe_blocks(model)
    assert all(".experts." in k for k in missing), missing
    details: dict[str, Any] = {
        "format": fmt,
        "group": group,
        "keep_high": keep,
        "high_format": HIGHER[fmt],
        "clip_search": clip_search,
        "kept_experts": {},
        "usage": {},
        "clip_error": {},
    }
    for i, moe in blocks.items():
        w13, w2 = moe.experts.w13_EDF2.detach().float(), moe.experts.w2_EFD.detach().float()
        high = kept_experts(usage[i], keep).tolist() if keep else []
        clips: dict[tuple[int, str], Tensor] = {}
        before = after = 0.0
        for e in range(moe.num_experts) if clip_search else ():
            e_fmt = HIGHER[fmt] if e in high else fmt
            if e_fmt == "fp32":
                continue
            for name, w in (("w13", w13[e]), ("w2", w2[e])):
                clip, err = best_clips(e_fmt, group, w, grams[i][name][e])
                clips[(e, name)] = clip
                before += float(err[0].sum())
                after += float(err.min(0).values.sum())
        experts: QuantizedExperts = quantized.blocks[i].ffn.experts  # type: ignore[assignment]
        experts.quantize_from(w13, w2, high, clips)
        details["kept_experts"][str(i)] = high
        if keep:
            details["usage"][str(i)] = usage[i].tolist()
        if clip_search:
            details["clip_error"][str(i)] = {"unclipped": before, "searched": after}
    return quantized.train(model.training), details
