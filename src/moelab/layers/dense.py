"""The dense FFN baseline, and the expert function every MoE expert computes."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moelab.layers.swiglu import swiglu

ACTIVATIONS = ("swiglu", "gelu", "relu", "silu")


def check_activation(activation: str) -> None:
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")


def check_positive_int(name: str, value: object) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


def up_width(d_hidden: int, activation: str) -> int:
    """Columns of the fused up-projection: gate and up halves for SwiGLU, one matrix otherwise."""
    return 2 * d_hidden if activation == "swiglu" else d_hidden


def activate(h: Tensor, activation: str) -> Tensor:
    """Hidden activation of the fused up-projection ``h = x @ w13``.

    For SwiGLU the first half of ``h`` is the gate (``x W1``) and the second the up
    projection (``x W3``): ``silu(x W1) * (x W3)``.
    """
    if activation == "swiglu":
        gate, up = h.chunk(2, dim=-1)
        return F.silu(gate) * up
    if activation == "gelu":
        return F.gelu(h)
    if activation == "relu":
        return F.relu(h)
    return F.silu(h)


def ffn(x: Tensor, w13: Tensor, w2: Tensor, activation: str) -> Tensor:
    """The FFN on rows of ``x`` (``[..., D]``) with ``w13: [D, 2F or F]`` and ``w2: [F, D]``."""
    return activate(x @ w13, activation) @ w2


class DenseFFN(nn.Module):
    """Position-wise FFN with no biases (LLaMA style).

    ``swiglu``: ``y = (silu(x W1) * (x W3)) W2``; other activations: ``y = act(x W1) W2``.
    W1 and W3 are stored fused as ``w13_DF2`` (``[D, 2F]``, gate half first) so that one matmul
    computes both; a dense FFN is exactly expert 0 of a one-expert :class:`~moelab.layers.MoE`
    (used to upcycle and to test).
    """

    def __init__(
        self, d_model: int, d_hidden: int, activation: str = "swiglu", init_std: float = 0.02
    ) -> None:
        super().__init__()
        check_positive_int("d_model", d_model)
        check_positive_int("d_hidden", d_hidden)
        check_activation(activation)
        if not init_std > 0:
            raise ValueError(f"init_std must be > 0, got {init_std!r}")
        self.d_model, self.d_hidden, self.activation = d_model, d_hidden, activation
        self.init_std = init_std
        self.w13_DF2 = nn.Parameter(torch.empty(d_model, up_width(d_hidden, activation)))
        self.w2_FD = nn.Parameter(torch.empty(d_hidden, d_model))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.w13_DF2, std=self.init_std)
        nn.init.normal_(self.w2_FD, std=self.init_std)

    def forward(
        self, x: Tensor, token_mask: Tensor | None = None, context: object | None = None
    ) -> Tensor:
        """``token_mask`` and ``context`` are accepted so every FFN slot has one signature."""
        if self.activation == "swiglu":  # the fused kernels the MoE experts use (same numbers)
            return swiglu(x @ self.w13_DF2) @ self.w2_FD
        return ffn(x, self.w13_DF2, self.w2_FD, self.activation)

    def extra_repr(self) -> str:
        return f"d_model={self.d_model}, d_hidden={self.d_hidden}, activation={self.activation}"
