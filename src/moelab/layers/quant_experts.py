"""Quantized experts: :class:`QuantizedExperts`, a drop-in for
:class:`~moelab.layers.experts.GroupedExperts` in inference.

Built when the MoE config says ``expert_quant: int8|int4`` (``expert_quant_group`` inputs share a
scale; ``expert_quant_keep`` experts per layer are held one step higher: int8 beside int4,
float32 beside int8). The weights live in two :mod:`~moelab.layers.quant_formats` banks, the
``low`` one for most experts and the ``high`` one for the kept ones; which experts are kept is the
buffer ``high_E`` (in the state dict, so the config stays one per model while each layer keeps
its own most-used experts). The forward takes the same expert-sorted rows as GroupedExperts and
runs each expert's two matmuls on its slice in its own format (float32 compute).

There are no parameters: quantized weights have no gradient, so a run with quantized experts
evaluates, generates and is analysed, but does not train (the trainer refuses it by the config).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from moelab.layers.dense import activate, up_width
from moelab.layers.quant_formats import BANKS, HIGHER, QUANT_FORMATS, QUANT_GROUPS, ExpertBank


def check_quant_args(
    expert_quant: str,
    group: int,
    keep: int,
    num_experts: int,
    d_model: int,
    expert_hidden: int,
) -> None:
    """``expert_quant``, ``expert_quant_group``, ``expert_quant_keep`` against the layer's sizes
    (one-line ``ValueError`` naming the option and the allowed values)."""
    if expert_quant not in QUANT_FORMATS:
        raise ValueError(f"expert_quant must be one of {QUANT_FORMATS}, got {expert_quant!r}")
    if expert_quant == "none":
        if keep:
            raise ValueError(f"expert_quant_keep must be 0 without expert_quant, got {keep!r}")
        return
    groups = QUANT_GROUPS[expert_quant]
    if group not in groups:
        raise ValueError(
            f"expert_quant_group must be one of {groups} for {expert_quant}, got {group!r}"
        )
    fits = [g for g in groups if not d_model % g and not expert_hidden % g]
    for name, width in (("d_model", d_model), ("the expert width", expert_hidden)):
        if width % group:
            raise ValueError(
                f"expert_quant_group must divide {name} ({width}); {expert_quant} allows "
                f"{fits or 'none of ' + str(groups)} for this model, got {group}"
            )
    if not isinstance(keep, int) or isinstance(keep, bool) or not 0 <= keep < num_experts:
        raise ValueError(
            f"expert_quant_keep must be an integer in [0, {num_experts}) (experts kept at "
            f"{HIGHER[expert_quant]}), got {keep!r}"
        )


class QuantizedExperts(nn.Module):
    """E experts in ``low`` (``expert_quant``) and ``high`` (one step up) precision banks.

    ``forward(x_ND, counts, weight_N=None)`` as :class:`~moelab.layers.experts.GroupedExperts`.
    Fill it with :meth:`quantize_from` (the float weights of a GroupedExperts and the kept ids),
    or by loading a state dict written from one.
    """

    def __init__(
        self,
        num_experts: int,
        d_model: int,
        d_hidden: int,
        activation: str,
        expert_quant: str,
        group: int,
        keep: int = 0,
    ) -> None:
        super().__init__()
        check_quant_args(expert_quant, group, keep, num_experts, d_model, d_hidden)
        if expert_quant == "none":
            raise ValueError("expert_quant must be 'int8' or 'int4' for quantized experts")
        self.num_experts, self.d_model, self.d_hidden = num_experts, d_model, d_hidden
        self.activation, self.expert_quant, self.group = activation, expert_quant, group
        self.backend = f"quant-{expert_quant}"
        shapes = {"w13": (up_width(d_hidden, activation), d_model), "w2": (d_model, d_hidden)}
        self.low: ExpertBank = BANKS[expert_quant](num_experts - keep, shapes, group)
        self.high: ExpertBank = BANKS[HIGHER[expert_quant]](keep, shapes, group)
        self.register_buffer("high_E", torch.arange(num_experts - keep, num_experts))

    # ---- where each expert lives ----------------------------------------------------------------

    def slots(self) -> list[tuple[ExpertBank, int]]:
        """``(bank, slot)`` of every expert, in expert order."""
        high = self.high_E.tolist()
        where: list[tuple[ExpertBank, int]] = []
        n_low = 0
        for e in range(self.num_experts):
            if e in high:
                where.append((self.high, high.index(e)))
            else:
                where.append((self.low, n_low))
                n_low += 1
        return where

    @torch.no_grad()
    def quantize_from(
        self,
        w13_EDF2: Tensor,
        w2_EFD: Tensor,
        high: list[int],
        clips: dict[tuple[int, str], Tensor] | None = None,
    ) -> None:
        """Fill the banks from float expert weights; ``high`` the experts kept one step up;
        ``clips[(e, name)]``: optional ``[N, K/group]`` clip ratios for expert ``e``'s matrix."""
        if len(high) != self.high.n or len(set(high)) != len(high):
            raise ValueError(f"high: needs {self.high.n} distinct expert ids, got {high}")
        self.high_E.copy_(torch.tensor(sorted(high)))
        clips = clips or {}
        for e, (bank, slot) in enumerate(self.slots()):
            for name, w in (("w13", w13_EDF2[e]), ("w2", w2_EFD[e])):
                bank.set_(slot, name, w, clips.get((e, name)))

    def dequantized(self) -> tuple[Tensor, Tensor]:
        """``(w13_EDF2, w2_EFD)``: the float weights the forward computes with."""
        w13, w2 = zip(
            *((b.dequantized(s, "w13"), b.dequantized(s, "w2")) for b, s in self.slots()),
            strict=True,
        )
        return torch.stack(w13), torch.stack(w2)

    # ---- compute --------------------------------------------------------------------------------

    def pad_limit(self, x: Tensor) -> float:
        return 0.0  # per-expert matmuls on unequal slices: no padding

    def resolved_backend(self, x: Tensor, counts: list[int] | None = None) -> str:
        return self.backend

    def expert_output(self, bank: ExpertBank, slot: int, x_nD: Tensor) -> Tensor:
        """One expert (``slot`` of ``bank``) on float32 rows: ``act(x·w13)·w2``."""
        return bank.linear(slot, "w2", activate(bank.linear(slot, "w13", x_nD), self.activation))

    def forward(self, x_ND: Tensor, counts: list[int], weight_N: Tensor | None = None) -> Tensor:
        x32 = x_ND.float()
        outs = [
            self.expert_output(bank, slot, x_nD)
            for (bank, slot), x_nD in zip(self.slots(), x32.split(counts), strict=True)
            if x_nD.shape[0]
        ]
        if not outs:
            y_ND = x32.new_zeros(0, self.d_model)
        else:
            y_ND = torch.cat(outs) if len(outs) > 1 else outs[0]
        y_ND = y_ND.to(x_ND.dtype)
        return y_ND if weight_N is None else y_ND * weight_N.to(y_ND.dtype)[:, None]

    def extra_repr(self) -> str:
        return (
            f"num_experts={self.num_experts}, d_model={self.d_model}, d_hidden={self.d_hidden}, "
            f"activation={self.activation}, expert_quant={self.expert_quant}, "
            f"group={self.group}, keep={self.high.n} at {self.high.fmt}"
        )
