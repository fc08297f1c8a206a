"""PKM: Product Key Memory (Lample et al. 2019, "Large Memory Layers with Product Keys").

``m(x) = Σ_{h=1..H} Σ_{i ∈ topk_h(x)} w_i(x) · m_i`` with ``w = softmax`` over the k retrieved
scores of head h (Lample et al. §3.2, eq. 2-4) and one value table ``m: [N, D]`` shared by the
heads. Each head has its own query network and its own sub-key sets (§3.3, multi-head memory);
queries are batch-normalised (§3.4). Baseline of PEER (N = 1024², H = 8, k = 32).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from moelab.layers.base import RoutedLayer, RoutingDecision, RoutingStats
from moelab.layers.product_keys import (
    RowGroups,
    UsageTracker,
    check_product_key_args,
    duplicated_retrievals,
    normalize_queries,
    product_key_topk,
    weighted_row_sum,
)
from moelab.native import advise_huge_pages, check_fits_in_memory


class PKM(RoutedLayer):
    """Product-key memory, a drop-in for an FFN: ``y = pkm(x, token_mask=None)``.

    Args mirror :class:`moelab.layers.peer.PEER`: ``num_memories`` (perfect square N), ``heads``,
    ``top_k`` (<= √N), ``d_key`` (even; default 256), ``query_batchnorm``, ``init_std`` (values:
    N(0, init_std); Lample uses N(0, D^-1/2)), ``sparse_grad``, ``check_memory``.
    """

    def __init__(
        self,
        d_model: int,
        num_memories: int = 1024**2,
        heads: int = 8,
        top_k: int = 32,
        d_key: int = 256,
        query_batchnorm: bool = True,
        init_std: float | None = None,
        sparse_grad: bool = True,
        check_memory: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(d_model, int) or d_model < 1:
            raise ValueError(f"d_model must be a positive integer, got {d_model!r}")
        self.num_sub_keys = check_product_key_args(
            num_keys=num_memories, top_k=top_k, d_key=d_key, heads=heads, keys_name="num_memories"
        )
        if init_std is not None and init_std <= 0:
            raise ValueError(f"init_std must be > 0 or None, got {init_std!r}")
        self.d_model, self.num_memories, self.heads, self.top_k, self.d_key = (
            d_model,
            num_memories,
            heads,
            top_k,
            d_key,
        )
        self.num_experts = num_memories
        self.sparse_grad = sparse_grad
        self.init_std = d_model**-0.5 if init_std is None else init_std
        factory = {"device": device, "dtype": dtype}
        elem = torch.empty((), **factory).element_size()
        if check_memory and torch.device(device or "cpu").type == "cpu":
            table = num_memories * d_model * elem
            check_fits_in_memory(
                f"PKM(num_memories={num_memories}, d_model={d_model})",
                param_bytes=table,
                state_bytes=2 * table + 4 * num_memories,
            )
        S = self.num_sub_keys
        self.query = nn.Linear(d_model, heads * d_key, bias=False, **factory)
        self.query_bn = nn.BatchNorm1d(heads * d_key, **factory) if query_batchnorm else None
        self.sub_keys = nn.Parameter(torch.empty(heads, 2, S, d_key // 2, **factory))
        self.values = nn.Parameter(advise_huge_pages(torch.empty(num_memories, d_model, **factory)))
        self.usage_tracker: UsageTracker | None = None
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        nn.init.normal_(self.query.weight, std=self.d_model**-0.5)
        nn.init.normal_(self.sub_keys, std=(self.d_key // 2) ** -0.5)
        nn.init.normal_(self.values, std=self.init_std)
        if self.query_bn is not None:
            self.query_bn.reset_parameters()

    def extra_repr(self) -> str:
        return (
            f"d_model={self.d_model}, num_memories={self.num_memories}, heads={self.heads}, "
            f"top_k={self.top_k}, d_key={self.d_key}, sparse_grad={self.sparse_grad}"
        )

    def retrieve(self, x_TD: Tensor, mask_T: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Queries → (scores ``[T, H, K]``, memory ids ``[T, H, K]``), per-head keys."""
        q_TC = normalize_queries(self.query_bn, self.query(x_TD), mask_T)
        q_THK = q_TC.view(x_TD.shape[0], self.heads, self.d_key)
        return product_key_topk(q_THK, self.sub_keys, self.top_k)

    def forward(self, x: Tensor, token_mask: Tensor | None = None) -> Tensor:
        shape = x.shape
        x_TD = x.reshape(-1, self.d_model)
        T = x_TD.shape[0]
        mask_T = None if token_mask is None else token_mask.reshape(-1).to(torch.bool)
        scores_THK, idx_THK = self.retrieve(x_TD, mask_T)
        w_THK = scores_THK.softmax(dim=-1)  # Lample et al. eq. 3
        idx_TR = idx_THK.reshape(T, -1)
        groups = RowGroups.build(idx_TR, self.num_memories)
        y_TD = weighted_row_sum(self.values, idx_TR, w_THK.reshape(T, -1), groups, self.sparse_grad)
        self._record(idx_THK, w_THK, mask_T, groups, x_TD, self.should_record())
        return y_TD.to(x.dtype).view(shape)

    # statistics and evaluation: identical semantics to PEER (z'_i = Σ_x w_i(x)).
    @torch.no_grad()
    def _record(
        self,
        idx_THK: Tensor,
        w_THK: Tensor,
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
                weight_N=w_THK.detach().reshape(-1),
                tokens_per_expert_E=torch.bincount(expert_N, minlength=self.num_memories),
                num_tokens=T,
                num_experts=self.num_memories,
            )
            self.routing_observer(self, decision, x_TD)
        if mask_T is not None:
            idx_THK, w_THK = idx_THK[mask_T], w_THK[mask_T]
        if self.usage_tracker is not None:
            self.usage_tracker.update(idx_THK, w_THK.detach())
        if not record:  # decided outside no_grad (should_record looks at grad mode)
            return
        n_valid = idx_THK.shape[0]
        distinct = groups.rows_U.numel() if mask_T is None else torch.unique(idx_THK).numel()
        per_token = idx_THK.shape[1] * idx_THK.shape[2]
        self.last_stats = RoutingStats(
            num_tokens=torch.tensor(n_valid),
            num_experts=self.num_memories,
            distinct_experts=torch.tensor(distinct),
            active_sum=torch.tensor(n_valid * per_token),
            active_min=torch.tensor(per_token),
            active_max=torch.tensor(per_token),
            extra={
                "duplicate_retrievals": duplicated_retrievals(idx_THK).sum(),
                "retrievals": torch.tensor(n_valid * per_token),
            },
        )

    def start_usage_tracking(self) -> None:
        """Accumulate ``z'_i = Σ_x w_i(x)`` over every forward until :meth:`stop_usage_tracking`."""
        self.usage_tracker = UsageTracker(self.num_memories, device=self.values.device)

    def usage_report(self) -> dict[str, float]:
        """Usage / unevenness / head-duplication of the pass so far (see PEER §3.3)."""
        if self.usage_tracker is None:
            raise RuntimeError("call start_usage_tracking() before usage_report()")
        return self.usage_tracker.report()

    def stop_usage_tracking(self) -> dict[str, float]:
        report = self.usage_report()
        self.usage_tracker = None
        return report
