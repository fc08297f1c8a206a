"""PEER: Parameter Efficient Expert Retrieval.

"Mixture of A Million Experts" (He 2024, arXiv 2407.04153):

``f(x) = Σ_{h=1..H} Σ_{i ∈ topk_h(x)} g_i(x) · e_i(x)`` with singleton experts
``e_i(x) = σ(u_iᵀx) · v_i`` (PEER eq. 1-3), where ``topk_h`` is the exact top-k of ``q_h(x)·k_i``
over N product keys (shared by all heads) found by
:func:`~moelab.layers.product_keys.product_key_topk`, and ``g`` is a softmax (default) or sigmoid
over the k scores of each head. Queries ``q_h(x)`` come from per-head linear query networks
followed by batch normalisation (PEER §2).

Cost does not grow with N except through retrieval (O(√N·d_key) per head) and the number of
*distinct* rows touched: the expert tables ``u, v: [N, D]`` are read only at retrieved rows with
fused gather kernels, and their gradients are sparse row sets (use
:func:`moelab.train.optim.build_optimizer`, which updates only those rows).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moelab.layers.product_key_layer import ProductKeyLayer
from moelab.layers.sparse_rows import RowGroups, gather_dot, weighted_row_sum

ACTIVATIONS = ("relu", "gelu")
GATES = ("softmax", "sigmoid")


def peer_gate(scores_THK: Tensor, gate: str) -> Tensor:
    """PEER §2: router weights over the k retrieved keys of each head (softmax default; sigmoid
    keeps all k non-competing weights - still k experts per head)."""
    return scores_THK.softmax(dim=-1) if gate == "softmax" else torch.sigmoid(scores_THK)


def expert_activation(h: Tensor, activation: str) -> Tensor:
    """σ in ``e_i(x) = σ(u_iᵀx) v_i`` (PEER eq. 3)."""
    return F.relu(h) if activation == "relu" else F.gelu(h)


class PEER(ProductKeyLayer):
    """PEER layer, a drop-in for an FFN: ``y = peer(x, token_mask=None)`` with ``x: [..., D]``.

    Args:
        d_model: D.
        num_experts: N, a perfect square (S = √N sub-keys per half). Default 1024².
        heads: H retrieval heads (independent query networks, one shared expert pool and key set).
        top_k: k experts per head (1 <= k <= √N).
        d_key: query / key size (even; each sub-key has d_key/2 entries).
        query_batchnorm: batch-norm the queries (PEER §2; improves usage and unevenness).
        activation: ``"relu"`` or ``"gelu"`` (σ of the singleton experts).
        gate: ``"softmax"`` (default) or ``"sigmoid"`` over each head's k scores.
        init_std: std of ``v`` (expert outputs) and of the query network; ``u`` uses 1/√D so that
            ``u_iᵀx`` is O(1).
        sparse_grad: sparse row gradients for ``u``/``v`` (default); False gives dense ``[N, D]``
            gradients (small N, or wrappers that cannot take sparse grads).
        check_memory: refuse to allocate (``MemoryError``) when parameters + AdamW state would not
            fit in available RAM.

    Retrieval, the forward pass, statistics and usage tracking come from
    :class:`~moelab.layers.product_key_layer.ProductKeyLayer`.
    """

    keys_name = "num_experts"

    def __init__(
        self,
        d_model: int,
        num_experts: int = 1024**2,
        heads: int = 8,
        top_k: int = 16,
        d_key: int = 128,
        query_batchnorm: bool = True,
        activation: str = "relu",
        gate: str = "softmax",
        init_std: float = 0.02,
        sparse_grad: bool = True,
        check_memory: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(
            d_model, num_experts, heads=heads, top_k=top_k, d_key=d_key, sparse_grad=sparse_grad
        )
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
        if gate not in GATES:
            raise ValueError(f"gate must be one of {GATES}, got {gate!r}")
        if init_std <= 0:
            raise ValueError(f"init_std must be > 0, got {init_std!r}")
        self.activation, self.gate, self.init_std = activation, gate, init_std
        self._build_retrieval(
            tables=2,
            shared_keys=True,
            query_batchnorm=query_batchnorm,
            check_memory=check_memory,
            device=device,
            dtype=dtype,
        )
        # u_i (expert input) and v_i (expert output) rows
        self.u = self._new_table(device, dtype)
        self.v = self._new_table(device, dtype)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        nn.init.normal_(self.query.weight, std=self.init_std)
        nn.init.normal_(self.sub_keys, std=(self.d_key // 2) ** -0.5)
        nn.init.normal_(self.u, std=self.d_model**-0.5)
        nn.init.normal_(self.v, std=self.init_std)
        if self.query_bn is not None:
            self.query_bn.reset_parameters()

    def extra_repr(self) -> str:
        return (
            f"d_model={self.d_model}, num_experts={self.num_experts}, heads={self.heads}, "
            f"top_k={self.top_k}, d_key={self.d_key}, activation={self.activation!r}, "
            f"gate={self.gate!r}, sparse_grad={self.sparse_grad}"
        )

    def retrieval_weights(self, scores_THK: Tensor) -> Tensor:
        """Router weights ``g`` over each head's k scores (PEER §2)."""
        return peer_gate(scores_THK, self.gate)

    def read_rows(self, x_TD: Tensor, idx_TR: Tensor, w_TR: Tensor, groups: RowGroups) -> Tensor:
        """``Σ_r g_r · σ(u_rᵀx) · v_r`` over the retrieved experts (PEER eq. 1-3)."""
        h_TR = gather_dot(self.u, idx_TR, x_TD, groups, self.sparse_grad)
        w_TR = w_TR * expert_activation(h_TR, self.activation)
        return weighted_row_sum(self.v, idx_TR, w_TR, groups, self.sparse_grad)
