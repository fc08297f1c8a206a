"""Experts of which the last few are compressed stand-ins (``moelab compress --method
compressed_experts``; He et al. 2025, "Efficiently Editing Mixture-of-Experts Models with
Compressed Experts", arXiv 2503.00634).

A layer of ``E`` routed experts with ``compressed_experts = C`` holds experts ``0 … E−C−1`` in
full (a :class:`~moelab.layers.experts.GroupedExperts` of width ``F``) and experts ``E−C … E−1``
as compressed experts: a vector ``b_c`` (the paper's compressed expert, a compact representation
of the expert's contribution) plus, when ``compressed_width = r > 0``, a narrow FFN of width
``r`` of the same activation, ``s_c(x) = b_c + act(x·W13_c)·W2_c``. The router is unchanged: it
still chooses among all ``E`` experts, and a token routed to a compressed expert gets that
stand-in's output times its gate. Because the full experts come first, the expert-sorted rows of
the dispatcher split into one contiguous block for each kind (no padding: ``pad_limit`` is 0).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from moelab.layers.experts import GroupedExperts

__all__ = ["PartlyCompressedExperts", "check_compressed_experts"]


def check_compressed_experts(
    compressed_experts: int, compressed_width: int, routed: int, expert_hidden: int | None
) -> None:
    """``compressed_experts`` in ``[0, routed)`` (at least one full expert) and
    ``compressed_width`` in ``[0, expert_hidden)`` (narrower than a full expert; the bound is
    checked when the width is known), 0 unless there are compressed experts."""
    for name, value in (
        ("compressed_experts", compressed_experts),
        ("compressed_width", compressed_width),
    ):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"{name} must be an integer >= 0, got {value!r}")
    if compressed_experts >= routed:
        raise ValueError(
            f"compressed_experts must be below the routed experts ({routed}: at least one full "
            f"expert), got {compressed_experts}"
        )
    if compressed_width and not compressed_experts:
        raise ValueError("compressed_width needs compressed_experts >= 1 (it is their width)")
    if expert_hidden is not None and compressed_width >= expert_hidden:
        raise ValueError(
            f"compressed_width must be below the width of one expert ({expert_hidden}), got "
            f"{compressed_width}"
        )


class PartlyCompressedExperts(nn.Module):
    """``num_experts`` routed experts, the last ``compressed`` of them compressed stand-ins.

    The same ``forward(x_ND, counts, weight_N=None)`` contract as
    :class:`~moelab.layers.experts.GroupedExperts` (rows sorted by expert, ``counts[e]`` each;
    outputs multiplied by ``weight_N`` when given). State: ``full.*`` (the full experts),
    ``bias_CD`` (one vector per compressed expert) and ``narrow.*`` (their narrow FFNs, when
    ``width > 0``).
    """

    def __init__(
        self,
        num_experts: int,
        compressed: int,
        d_model: int,
        d_hidden: int,
        width: int,
        activation: str = "swiglu",
        init_std: float = 0.02,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        check_compressed_experts(compressed, width, num_experts, d_hidden)
        self.num_experts, self.compressed, self.d_model = num_experts, compressed, d_model
        self.num_full = num_experts - compressed
        self.full = GroupedExperts(self.num_full, d_model, d_hidden, activation, init_std, backend)
        # the compressed experts start as zero vectors; moelab compress fits them
        self.bias_CD = nn.Parameter(torch.zeros(compressed, d_model))
        self.narrow = (
            GroupedExperts(compressed, d_model, width, activation, init_std, backend)
            if width
            else None
        )

    def pad_limit(self, x: Tensor) -> float:
        """No padding: the full and compressed experts' rows must stay contiguous blocks."""
        return 0.0

    def forward(self, x_ND: Tensor, counts: list[int], weight_N: Tensor | None = None) -> Tensor:
        n_full = sum(counts[: self.num_full])
        full_w = None if weight_N is None else weight_N[:n_full]
        y_full = self.full(x_ND[:n_full], counts[: self.num_full], full_w)
        counts_C = counts[self.num_full :]
        rows = torch.tensor(counts_C, device=x_ND.device)
        y_comp = self.bias_CD.to(x_ND.dtype).repeat_interleave(
            rows, dim=0, output_size=x_ND.shape[0] - n_full
        )
        if self.narrow is not None:
            y_comp = y_comp + self.narrow(x_ND[n_full:], counts_C)
        if weight_N is not None:
            y_comp = y_comp * weight_N[n_full:].to(y_comp.dtype)[:, None]
        return torch.cat([y_full, y_comp])

    def flops_per_assignment(self) -> tuple[int, int]:
        """Forward FLOPs of one (token, expert) assignment of a full and of a compressed expert
        (2 per matmul weight; the stand-in's vector adds ``D``)."""
        full = 2 * sum(p[0].numel() for p in self.full.parameters())
        narrow = (
            0 if self.narrow is None else 2 * sum(p[0].numel() for p in self.narrow.parameters())
        )
        return full, narrow + self.d_model

    def extra_repr(self) -> str:
        width = 0 if self.narrow is None else self.narrow.d_hidden
        return (
            f"num_experts={self.num_experts}, compressed={self.compressed}, "
            f"compressed_width={width}"
        )
