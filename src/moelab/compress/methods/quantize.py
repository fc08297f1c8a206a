"""``--method quantize``: routed experts stored as group-wise int8 or int4 (weight-only), the
most-used experts of each layer one step higher, the router at full precision, and each group's
clipping chosen on the calibration tokens routed to its expert (EAQuant's expert-aware parts that
apply to weight-only quantization; :mod:`moelab.compress.quantization`). The written run says so in
``model.ffn.expert_quant`` and reloads with quantized experts: it evaluates, generates and is
analysed; it does not train. Needs torchao (``pip install 'moelab[compress]'``).
"""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, Any

from moelab.compress.methods.base import (
    SUITE_RATIOS,
    Calibration,
    CompressMethod,
    CompressOutcome,
    SuiteSetting,
    layer_changes,
    module_bytes,
    module_params,
    register_method,
)
from moelab.compress.prune import moe_blocks
from moelab.compress.quantization import check_quantizable, quant_format, quantize_model
from moelab.layers.quant_formats import QUANT_GROUPS

if TYPE_CHECKING:
    from moelab.layers.moe import MoE
    from moelab.model import TransformerLM


def _keep_high(value: str) -> float:
    return float(value)


@register_method
class Quantize(CompressMethod):
    name = "quantize"
    summary = (
        "store routed experts as group-wise int8/int4 (torchao), most-used experts one step "
        "higher, router-weighted clipping (expert-aware PTQ after EAQuant, Fu et al. 2025)"
    )
    capability = None
    takes_ratio = False

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        parser.add_argument(
            "--bits", type=int, default=8, help="quantize: expert weight width, 8 or 4"
        )
        parser.add_argument(
            "--quant-group",
            type=int,
            default=None,
            help="quantize: inputs sharing one scale (int8: 8-256, int4: 32-256, a power of two "
            "dividing the widths; default: 32, or the nearest size that divides them)",
        )
        parser.add_argument(
            "--keep-high",
            type=_keep_high,
            default=0,
            help="quantize: most-used experts per layer kept one step higher (int8 beside int4, "
            "fp32 beside int8): a count, or a fraction of the experts below 1",
        )
        parser.add_argument(
            "--clip-search",
            action=argparse.BooleanOptionalAction,
            default=True,
            help="quantize: choose each group's clipping on the routed calibration tokens",
        )

    @classmethod
    def suite_settings(
        cls, model: TransformerLM, ratios: tuple[float, ...] = SUITE_RATIOS
    ) -> list[SuiteSetting]:
        """int8 and int4 (no ratio), each with the largest group its kernel allows that divides
        the model's ``d_model`` and expert width (the default 32 when none does: that setting
        is then refused, and the suite's table says why)."""
        blocks = moe_blocks(model)
        moe = next(iter(blocks.values()), None)
        settings = []
        for bits in (8, 4):
            fits = [
                g
                for g in QUANT_GROUPS[quant_format(bits)]
                if moe is not None and moe.d_model % g == 0 and moe.expert_hidden % g == 0
            ]
            group = max(fits, default=32)
            settings.append(
                SuiteSetting(f"int{bits} g{group}", None, {"bits": bits, "quant_group": group})
            )
        return settings

    def __init__(self, ratio: float | None, options: dict[str, Any]) -> None:
        super().__init__(ratio, options)
        self.fmt = quant_format(self.options["bits"])  # refused before any work
        self.group: int | None = self.options["quant_group"]
        self.clip_search = bool(self.options["clip_search"])

    def keep(self, model: TransformerLM) -> int:
        """``--keep-high`` as a count of experts per layer (a fraction below 1 rounds down)."""
        value = self.options["keep_high"]
        blocks = moe_blocks(model)
        n = next(iter(blocks.values())).num_experts if blocks else 0
        if isinstance(value, bool) or not 0 <= value < n:
            raise ValueError(
                f"--keep-high: must be a count in [0, {n}) or a fraction in [0, 1), got {value!r}"
            )
        if value < 1:
            return int(value * n)
        if value != int(value):
            raise ValueError(f"--keep-high: a count must be a whole number, got {value!r}")
        return int(value)

    def group_for(self, model: TransformerLM) -> int:
        """``--quant-group``, or by default 32 when it divides the model's widths, else the
        allowed size nearest 32 that does (the presets' 344-wide experts take 8 in int8); with
        none, 32, which :func:`check_quantizable` then refuses naming the allowed sizes."""
        if self.group is not None:
            return self.group
        blocks = moe_blocks(model)
        widths = [model.cfg.d_model] + [b.expert_hidden for b in blocks.values()][:1]
        fits = [g for g in QUANT_GROUPS[self.fmt] if all(w % g == 0 for w in widths)]
        return min(fits, key=lambda g: (abs(g - 32), g)) if fits else 32

    def check(self, model: TransformerLM) -> None:
        if not moe_blocks(model):
            raise ValueError("model: no MoE layer to quantize (model.ffn.kind must be 'moe')")
        check_quantizable(model, self.fmt, self.group_for(model), self.keep(model))

    def apply(self, model: TransformerLM, calib: Calibration) -> CompressOutcome:
        keep = self.keep(model)
        group = self.group_for(model)
        quantized, details = quantize_model(
            model, self.options["bits"], group, keep, calib.batches, self.clip_search
        )
        after = moe_blocks(quantized)
        layers = layer_changes(model, quantized, params_after=_stored_params)
        details["expert_bytes"] = {
            str(i): {"before": module_bytes(moe.experts), "after": module_bytes(after[i].experts)}
            for i, moe in moe_blocks(model).items()
        }
        return CompressOutcome(quantized, layers, details)


def _stored_params(before: MoE, after: MoE) -> int:
    """The quantized layer's parameters plus its experts' weights: the same weights, stored in
    fewer bits (buffers, not parameters)."""
    return module_params(after) + sum(p.numel() for p in before.experts.parameters())
