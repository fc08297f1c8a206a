"""The dense FFN baseline (and the expert function every MoE expert computes)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

ACTIVATIONS = ("swiglu", "gelu", "relu", "silu")


def check_activation(activation: str) -> None:
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")


class DenseFFN(nn.Module):
    """Position-wise FFN with no biases (LLaMA style).

    ``swiglu``: ``y = (silu(x W1) * (x W3)) W2`` (three matrices); other activations use two,
    ``y = act(x W1) W2``. Weights are stored ``w1_DF``/``w3_DF``/``w2_FD`` so that a dense FFN is
    exactly expert 0 of a one-expert :class:`~moelab.layers.MoE` (used to upcycle and to test).
    """

    def __init__(
        self, d_model: int, d_hidden: int, activation: str = "swiglu", init_std: float = 0.02
    ) -> None:
        super().__init__()
        for name, v in (("d_model", d_model), ("d_hidden", d_hidden)):
            if not isinstance(v, int) or v <= 0:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        check_activation(activation)
        if not init_std > 0:
            raise ValueError(f"init_std must be > 0, got {init_std!r}")
        self.d_model, self.d_hidden, self.activation = d_model, d_hidden, activation
        self.w1_DF = nn.Parameter(torch.empty(d_model, d_hidden))
        self.w3_DF = nn.Parameter(torch.empty(d_model, d_hidden)) if activation == "swiglu" else None
        self.w2_FD = nn.Parameter(torch.empty(d_hidden, d_model))
        self.init_std = init_std
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for p in (self.w1_DF, self.w3_DF, self.w2_FD):
            if p is not None:
                nn.init.normal_(p, std=self.init_std)

    def forward(self, x: Tensor, token_mask: Tensor | None = None) -> Tensor:
        return ffn(x, self.w1_DF, self.w3_DF, self.w2_FD, self.activation)

    def extra_repr(self) -> str:
        return f"d_model={self.d_model}, d_hidden={self.d_hidden}, activation={self.activation}"


def ffn(x: Tensor, w1: Tensor, w3: Tensor | None, w2: Tensor, activation: str) -> Tensor:
    """The expert function on rows of ``x`` (``[..., D]``) with ``[D, F]``/``[F, D]`` weights."""
    h = x @ w1
    if activation == "swiglu":
        h = F.silu(h) * (x @ w3)
    elif activation == "gelu":
        h = F.gelu(h)
    elif activation == "relu":
        h = F.relu(h)
    else:
        h = F.silu(h)
    return h @ w2
