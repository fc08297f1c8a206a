"""PEER: Parameter Efficient Expert Retrieval.

"Mixture of A Million Experts" (He 2024, arXiv 2407.04153):

``f(x) = Σ_{h=1..H} Σ_{i ∈ topk_h(x)} g_i(x) · e_i(x)`` with singleton experts
``e_i(x) = σ(u_iᵀx) · v_i`` (PEER eq. 1-3), where ``topk_h`` is the exact top-k of ``q_h(x)·k_i``
over N product keys (shared by all heads) found by :func:`product_key_topk`, and ``g`` is a softmax
(default) or sigmoid over the k scores of each head. Queries ``q_h(x)`` come from per-head linear
query networks followed by batch normalisation (PEER §2).

Cost does not grow with N except through retrieval (O(√N·d_key) per head) and the number of
*distinct* rows touched: the expert tables ``u, v: [N, D]`` are read only at retrieved rows with
fused gather kernels, and their gradients are sparse row sets (use
:func:`moelab.train.optim.build_optimizer`, which updates only those rows).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moelab.layers.base import RoutedLayer, RoutingDecision, RoutingStats
from moelab.layers.product_keys import (
    RowGroups,
    UsageTracker,
    check_product_key_args,
    duplicated_retrievals,
    gather_dot,
    normalize_queries,
    product_key_topk,
    weighted_row_sum,
)
from moelab.native import advise_huge_pages, check_fits_in_memory

ACTIVATIONS = ("relu", "gelu")
GATES = ("softmax", "sigmoid")


def peer_gate(scores_THK: Tensor, gate: str) -> Tensor:
    """PEER §2: router weights over the k retrieved keys of each head (softmax default; sigmoid
    keeps all k non-competing weights - still k experts per head)."""
    return scores_THK.softmax(dim=-1) if gate == "softmax" else torch.sigmoid(scores_THK)


def expert_activation(h: Tensor, activation: str) -> Tensor:
    """σ in ``e_i(x) = σ(u_iᵀx) v_i`` (PEER eq. 3)."""
    return F.relu(h) if activation == "relu" else F.gelu(h)


class PEER(RoutedLayer):
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
    """

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
        super().__init__()
        if not isinstance(d_model, int) or d_model < 1:
            raise ValueError(f"d_model must be a positive integer, got {d_model!r}")
        self.num_sub_keys = check_product_key_args(
            num_keys=num_experts, top_k=top_k, d_key=d_key, heads=heads, keys_name="num_experts"
        )
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
        if gate not in GATES:
            raise ValueError(f"gate must be one of {GATES}, got {gate!r}")
        if init_std <= 0:
            raise ValueError(f"init_std must be > 0, got {init_std!r}")
        self.d_model, self.num_experts, self.heads, self.top_k, self.d_key = (
            d_model,
            num_experts,
            heads,
            top_k,
            d_key,
        )
        self.activation, self.gate, self.sparse_grad = activation, gate, sparse_grad
        factory = {"device": device, "dtype": dtype}
        elem = torch.empty((), **factory).element_size()
        if check_memory and torch.device(device or "cpu").type == "cpu":
            table = num_experts * d_model * elem
            check_fits_in_memory(
                f"PEER(num_experts={num_experts}, d_model={d_model})",
                param_bytes=2 * table,
                state_bytes=2 * 2 * table + 2 * 4 * num_experts,
            )
        S = self.num_sub_keys
        self.query = nn.Linear(d_model, heads * d_key, bias=False, **factory)
        self.query_bn = nn.BatchNorm1d(heads * d_key, **factory) if query_batchnorm else None
        self.sub_keys = nn.Parameter(torch.empty(1, 2, S, d_key // 2, **factory))
        # u_i (expert input) and v_i (expert output) rows, huge-page backed (random row reads)
        self.u = nn.Parameter(advise_huge_pages(torch.empty(num_experts, d_model, **factory)))
        self.v = nn.Parameter(advise_huge_pages(torch.empty(num_experts, d_model, **factory)))
        self.init_std = init_std
        self.usage_tracker: UsageTracker | None = None
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

    # ----------------------------------------------------------------------------- retrieval
    def retrieve(self, x_TD: Tensor, mask_T: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Queries → (scores ``[T, H, K]``, expert ids ``[T, H, K]``)."""
        q_TC = normalize_queries(self.query_bn, self.query(x_TD), mask_T)
        q_THK = q_TC.view(x_TD.shape[0], self.heads, self.d_key)
        return product_key_topk(q_THK, self.sub_keys, self.top_k)

    # ----------------------------------------------------------------------------- forward
    def forward(self, x: Tensor, token_mask: Tensor | None = None) -> Tensor:
        shape = x.shape
        x_TD = x.reshape(-1, self.d_model)
        T = x_TD.shape[0]
        mask_T = None if token_mask is None else token_mask.reshape(-1).to(torch.bool)
        scores_THK, idx_THK = self.retrieve(x_TD, mask_T)
        gate_THK = peer_gate(scores_THK, self.gate)
        idx_TR = idx_THK.reshape(T, -1)
        groups = RowGroups.build(idx_TR, self.num_experts)
        h_TR = gather_dot(self.u, idx_TR, x_TD, groups, self.sparse_grad)
        w_TR = gate_THK.reshape(T, -1) * expert_activation(h_TR, self.activation)
        y_TD = weighted_row_sum(self.v, idx_TR, w_TR, groups, self.sparse_grad)
        self._record(idx_THK, gate_THK, mask_T, groups, x_TD, self.should_record())
        return y_TD.to(x.dtype).view(shape)

    # ----------------------------------------------------------------------------- statistics
    @torch.no_grad()
    def _record(
        self,
        idx_THK: Tensor,
        gate_THK: Tensor,
        mask_T: Tensor | None,
        groups: RowGroups,
        x_TD: Tensor,
        record: bool,
    ) -> None:
        if self.routing_observer is not None:
            T, R = idx_THK.shape[0], idx_THK.shape[1] * idx_THK.shape[2]
            expert_N = idx_THK.reshape(-1)
            decision = RoutingDecision(
                token_idx_N=torch.arange(T, device=x_TD.device).repeat_interleave(R),
                expert_idx_N=expert_N,
                weight_N=gate_THK.detach().reshape(-1),
                tokens_per_expert_E=torch.bincount(expert_N, minlength=self.num_experts),
                num_tokens=T,
                num_experts=self.num_experts,
            )
            self.routing_observer(self, decision, x_TD)
        if mask_T is not None:
            idx_THK, gate_THK = idx_THK[mask_T], gate_THK[mask_T]
        if self.usage_tracker is not None:
            self.usage_tracker.update(idx_THK, gate_THK.detach())
        if not record:  # decided outside no_grad (should_record looks at grad mode)
            return
        n_valid = idx_THK.shape[0]
        distinct = groups.rows_U.numel() if mask_T is None else torch.unique(idx_THK).numel()
        dup = duplicated_retrievals(idx_THK).sum()
        per_token = idx_THK.shape[1] * idx_THK.shape[2]
        self.last_stats = RoutingStats(
            num_tokens=torch.tensor(n_valid),
            num_experts=self.num_experts,
            distinct_experts=torch.tensor(distinct),
            active_sum=torch.tensor(n_valid * per_token),
            active_min=torch.tensor(per_token),
            active_max=torch.tensor(per_token),
            extra={"duplicate_retrievals": dup, "retrievals": torch.tensor(n_valid * per_token)},
        )

    # ----------------------------------------------------------------------------- evaluation
    def start_usage_tracking(self) -> None:
        """Start accumulating ``z'_i = Σ_x g_i(x)`` over every forward (any mode) until
        :meth:`usage_report` / :meth:`stop_usage_tracking`."""
        self.usage_tracker = UsageTracker(self.num_experts, device=self.u.device)

    def usage_report(self) -> dict[str, float]:
        """PEER §3.3 usage (fraction of experts with non-zero summed gate) and unevenness
        (``log N + Σ z log z``), plus the fraction of retrievals duplicated across heads."""
        if self.usage_tracker is None:
            raise RuntimeError("call start_usage_tracking() before usage_report()")
        return self.usage_tracker.report()

    def stop_usage_tracking(self) -> dict[str, float]:
        """Final report; frees the accumulator."""
        report = self.usage_report()
        self.usage_tracker = None
        return report
