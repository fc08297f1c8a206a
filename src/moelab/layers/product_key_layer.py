"""The skeleton PEER and PKM share: product-key retrieval, a forward template, statistics, usage.

:class:`ProductKeyLayer` owns everything the two layers have in common - argument checks, the
query network, query batch norm and sub-keys, the memory check before allocating the ``[N, D]``
tables, :meth:`~ProductKeyLayer.retrieve`, the forward pass up to the paper-specific part, the
routing record (observer, ``last_stats``) and usage tracking. A subclass adds its tables,
``reset_parameters`` and two methods: :meth:`~ProductKeyLayer.retrieval_weights` (scores to
weights) and :meth:`~ProductKeyLayer.read_rows` (weights and retrieved rows to the output).

Shape legend (see ``moelab.layers.base``): T tokens, D model dim, H heads, K top-k, N = S² table
rows (experts / memories), R = H·K retrievals per token.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from moelab.layers.base import RoutedLayer, RoutingDecision, RoutingStats
from moelab.layers.product_keys import (
    check_product_key_args,
    duplicated_retrievals,
    normalize_queries,
    product_key_topk,
)
from moelab.layers.sparse_rows import RowGroups
from moelab.layers.usage import UsageTracker
from moelab.native import advise_huge_pages, check_fits_in_memory


class ProductKeyLayer(RoutedLayer):
    """Base of the product-key layers (:class:`~moelab.layers.peer.PEER`,
    :class:`~moelab.layers.pkm.PKM`): ``y = layer(x, token_mask=None)`` with ``x: [..., D]``.

    Construction is in two steps so that a subclass checks its own arguments after the shared ones
    and before anything is allocated: ``super().__init__(...)`` validates and stores the shared
    hyper-parameters, then :meth:`_build_retrieval` checks memory and creates the query network,
    query batch norm and sub-keys, then the subclass creates its tables (:meth:`_new_table`).
    ``num_experts`` is N whatever the subclass calls it (``keys_name``, the constructor argument
    named in errors).
    """

    keys_name = "num_keys"

    def __init__(
        self, d_model: int, num_keys: int, *, heads: int, top_k: int, d_key: int, sparse_grad: bool
    ) -> None:
        super().__init__()
        if not isinstance(d_model, int) or d_model < 1:
            raise ValueError(f"d_model must be a positive integer, got {d_model!r}")
        self.num_sub_keys = check_product_key_args(
            num_keys=num_keys, top_k=top_k, d_key=d_key, heads=heads, keys_name=self.keys_name
        )
        self.d_model, self.num_experts, self.heads, self.top_k, self.d_key = (
            d_model,
            num_keys,
            heads,
            top_k,
            d_key,
        )
        self.sparse_grad = sparse_grad
        self.usage_tracker: UsageTracker | None = None

    def _build_retrieval(
        self,
        *,
        tables: int,
        shared_keys: bool,
        query_batchnorm: bool,
        check_memory: bool,
        device: torch.device | str | None,
        dtype: torch.dtype | None,
    ) -> None:
        """Memory check for ``tables`` ``[N, D]`` tables, then ``query``, ``query_bn``, ``sub_keys``
        (one key set shared by the heads, or one per head)."""
        factory = {"device": device, "dtype": dtype}
        N, D = self.num_experts, self.d_model
        elem = torch.empty((), **factory).element_size()
        if check_memory and torch.device(device or "cpu").type == "cpu":
            table = N * D * elem
            check_fits_in_memory(
                f"{type(self).__name__}({self.keys_name}={N}, d_model={D})",
                param_bytes=tables * table,
                # AdamW per table: two moments like the table and an int32 step per row
                state_bytes=tables * 2 * table + tables * 4 * N,
            )
        S, H = self.num_sub_keys, self.heads
        self.query = nn.Linear(D, H * self.d_key, bias=False, **factory)
        self.query_bn = nn.BatchNorm1d(H * self.d_key, **factory) if query_batchnorm else None
        key_sets = 1 if shared_keys else H
        self.sub_keys = nn.Parameter(torch.empty(key_sets, 2, S, self.d_key // 2, **factory))

    def _new_table(
        self, device: torch.device | str | None, dtype: torch.dtype | None
    ) -> nn.Parameter:
        """An uninitialised ``[N, D]`` table, huge-page backed (it is read at random rows)."""
        table = torch.empty(self.num_experts, self.d_model, device=device, dtype=dtype)
        return nn.Parameter(advise_huge_pages(table))

    # ----------------------------------------------------------------------------- retrieval
    def retrieve(self, x_TD: Tensor, mask_T: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Queries → (scores ``[T, H, K]``, row ids ``[T, H, K]``), best first per head."""
        q_TC = normalize_queries(self.query_bn, self.query(x_TD), mask_T)
        q_THK = q_TC.view(x_TD.shape[0], self.heads, self.d_key)
        return product_key_topk(q_THK, self.sub_keys, self.top_k)

    def retrieval_weights(self, scores_THK: Tensor) -> Tensor:
        """Weights ``[T, H, K]`` of the retrieved rows from their scores (per head)."""
        raise NotImplementedError

    def read_rows(self, x_TD: Tensor, idx_TR: Tensor, w_TR: Tensor, groups: RowGroups) -> Tensor:
        """The layer's output ``[T, D]`` from the retrieved rows ``idx_TR`` and weights ``w_TR``."""
        raise NotImplementedError

    # ----------------------------------------------------------------------------- forward
    def forward(self, x: Tensor, token_mask: Tensor | None = None) -> Tensor:
        shape = x.shape
        x_TD = x.reshape(-1, self.d_model)
        T = x_TD.shape[0]
        mask_T = None if token_mask is None else token_mask.reshape(-1).to(torch.bool)
        scores_THK, idx_THK = self.retrieve(x_TD, mask_T)
        w_THK = self.retrieval_weights(scores_THK)
        idx_TR = idx_THK.reshape(T, -1)
        groups = RowGroups.build(idx_TR)  # one sort per forward, shared by every table read
        y_TD = self.read_rows(x_TD, idx_TR, w_THK.reshape(T, -1), groups)
        self._record(idx_THK, w_THK, mask_T, groups, x_TD, self.should_record())
        return y_TD.to(x.dtype).view(shape)

    # ----------------------------------------------------------------------------- statistics
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
        """Observer (all tokens), usage tracker (valid tokens), ``last_stats`` if ``record``."""
        if self.routing_observer is not None:
            T, R = idx_THK.shape[0], idx_THK.shape[1] * idx_THK.shape[2]
            expert_N = idx_THK.reshape(-1)
            decision = RoutingDecision(
                token_idx_N=torch.arange(T, device=x_TD.device).repeat_interleave(R),
                expert_idx_N=expert_N,
                weight_N=w_THK.detach().reshape(-1),
                tokens_per_expert_E=torch.bincount(expert_N, minlength=self.num_experts),
                num_tokens=T,
                num_experts=self.num_experts,
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
            num_experts=self.num_experts,
            distinct_experts=torch.tensor(distinct),
            active_sum=torch.tensor(n_valid * per_token),
            active_min=torch.tensor(per_token),
            active_max=torch.tensor(per_token),
            extra={
                "duplicate_retrievals": duplicated_retrievals(idx_THK).sum(),
                "retrievals": torch.tensor(n_valid * per_token),
            },
        )

    # ----------------------------------------------------------------------------- evaluation
    def start_usage_tracking(self) -> None:
        """Start accumulating ``z'_i = Σ_x w_i(x)`` (the retrieval weights) over every forward (any
        mode) until :meth:`usage_report` / :meth:`stop_usage_tracking`."""
        self.usage_tracker = UsageTracker(self.num_experts, device=self.sub_keys.device)

    def usage_report(self) -> dict[str, float]:
        """PEER §3.3 usage (fraction of rows with non-zero summed weight) and unevenness
        (``log N + Σ z log z``), plus the fraction of retrievals duplicated across heads."""
        if self.usage_tracker is None:
            raise RuntimeError("call start_usage_tracking() before usage_report()")
        return self.usage_tracker.report()

    def stop_usage_tracking(self) -> dict[str, float]:
        """Final report; frees the accumulator."""
        report = self.usage_report()
        self.usage_tracker = None
        return report
