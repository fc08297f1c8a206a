"""The skeleton PEER and PKM share: product-key retrieval, a forward template, statistics, usage.

:class:`ProductKeyLayer` owns everything the two layers have in common - argument checks, the
query network, query batch norm and sub-keys, the memory check before allocating the ``[N, D]``
tables, :meth:`~ProductKeyLayer.retrieve`, the forward pass up to the paper-specific part, the
routing record (observer, ``last_stats``) and usage tracking. A subclass adds its tables,
``reset_parameters`` and two methods: :meth:`~ProductKeyLayer.retrieval_weights` (scores to
weights) and :meth:`~ProductKeyLayer.read_rows` (weights and retrieved rows to the output).

Shape legend (see ``moelab.layers.base``): T tokens, D model dim, H heads, K top-k, N = S² table
rows (experts / memories), R = H·K retrievals per token, V valid (non-padding) tokens.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from moelab.layers.base import RoutedLayer, RoutingContext, RoutingDecision, RoutingStats
from moelab.layers.product_keys import (
    as_int,
    check_product_key_args,
    normalize_queries,
    product_key_topk,
)
from moelab.layers.sparse_rows import RowGroups
from moelab.layers.usage import UsageTracker
from moelab.native import adamw_state_dtype, advise_huge_pages, check_fits_in_memory


class ProductKeyLayer(RoutedLayer):
    """Base of the product-key layers (:class:`~moelab.layers.peer.PEER`,
    :class:`~moelab.layers.pkm.PKM`): ``y = layer(x, token_mask=None)`` with ``x: [..., D]``.

    Construction is in two steps so that a subclass checks its own arguments after the shared ones
    and before anything is allocated: ``super().__init__(...)`` validates and stores the shared
    hyper-parameters, then :meth:`_build_retrieval` checks memory and creates the query network,
    query batch norm and sub-keys, then the subclass creates its tables (:meth:`_new_table`).
    ``num_experts`` is N whatever the subclass calls it (``keys_name``, the constructor argument
    named in errors). Sizes may be any integral numbers (``np.int64`` ...); they are stored as int.

    Padding (``token_mask`` False) is dropped before retrieval: it touches no table row (no
    gradient entry, so no optimizer update of any kind), never moves the batch-norm statistics,
    and its output is zero. An empty or all-padding input gives a zero output of the input's shape.
    """

    keys_name = "num_keys"
    #: which grid candidates the second top-k scores (see product_key_topk); "grid" is the k² path
    #: kept as a reference, for ``moelab bench peer`` to compare in one process
    candidates = "staircase"

    def __init__(
        self, d_model: int, num_keys: int, *, heads: int, top_k: int, d_key: int, sparse_grad: bool
    ) -> None:
        super().__init__()
        if as_int(d_model) is None or d_model < 1:
            raise ValueError(f"d_model must be a positive integer, got {d_model!r}")
        self.num_sub_keys = check_product_key_args(
            num_keys=num_keys, top_k=top_k, d_key=d_key, heads=heads, keys_name=self.keys_name
        )
        self.d_model, self.num_experts, self.heads, self.top_k, self.d_key = (
            int(d_model),
            int(num_keys),
            int(heads),
            int(top_k),
            int(d_key),
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
        factory_dtype = torch.empty((), **factory).dtype
        elem = torch.empty((), dtype=factory_dtype).element_size()
        if check_memory and torch.device(device or "cpu").type == "cpu":
            table = N * D * elem
            moment = N * D * torch.empty((), dtype=adamw_state_dtype(factory_dtype)).element_size()
            check_fits_in_memory(
                f"{type(self).__name__}({self.keys_name}={N}, d_model={D})",
                param_bytes=tables * table,
                # AdamW per table: two moments (float32 for 16-bit tables) and an int32 step per row
                state_bytes=tables * 2 * moment + tables * 4 * N,
            )
        S, H = self.num_sub_keys, self.heads
        self.query = nn.Linear(D, H * self.d_key, bias=False, **factory)
        self.query_bn = nn.BatchNorm1d(H * self.d_key, **factory) if query_batchnorm else None
        key_sets = 1 if shared_keys else H
        self.assignment_flops = 2 * tables * D  # one retrieved row of each table, per token
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
        return product_key_topk(q_THK, self.sub_keys, self.top_k, self.candidates)

    def retrieval_weights(self, scores_THK: Tensor) -> Tensor:
        """Weights ``[T, H, K]`` of the retrieved rows from their scores (per head)."""
        raise NotImplementedError

    def read_rows(self, x_TD: Tensor, idx_TR: Tensor, w_TR: Tensor, groups: RowGroups) -> Tensor:
        """The layer's output ``[T, D]`` from the retrieved rows ``idx_TR`` and weights ``w_TR``."""
        raise NotImplementedError

    # ----------------------------------------------------------------------------- forward
    def _check_input(self, x: Tensor, token_mask: Tensor | None) -> None:
        """Shape / dtype checks up front: a wrong width would otherwise be silently re-split into
        a different number of tokens by the flattening reshape."""
        name = type(self).__name__
        if not isinstance(x, Tensor) or x.ndim < 1 or x.shape[-1] != self.d_model:
            got = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(f"{name} expects x of shape [..., d_model={self.d_model}], got {got}")
        if not x.is_floating_point():
            raise ValueError(f"{name} expects a floating-point x, got dtype {x.dtype}")
        if token_mask is not None:
            if not isinstance(token_mask, Tensor) or token_mask.shape != x.shape[:-1]:
                got = tuple(token_mask.shape) if isinstance(token_mask, Tensor) else token_mask
                raise ValueError(
                    f"token_mask must have the leading shape of x {tuple(x.shape[:-1])}, got {got}"
                )
            if token_mask.is_floating_point() or token_mask.is_complex():
                raise ValueError(
                    f"token_mask must be bool (True = real token), got dtype {token_mask.dtype}"
                )

    def forward(
        self, x: Tensor, token_mask: Tensor | None = None, context: RoutingContext | None = None
    ) -> Tensor:
        self._check_input(x, token_mask)
        shape = x.shape
        x_TD = x.reshape(-1, self.d_model)
        T = x_TD.shape[0]
        pos_V = None  # positions of the valid tokens in x_TD; None: every token is valid
        if token_mask is not None:
            mask_T = token_mask.reshape(-1).to(torch.bool)
            if not bool(mask_T.all()):
                pos_V = mask_T.nonzero().squeeze(1)
        # padding never reaches retrieval: it touches no row and never moves the BN statistics
        x_VD = x_TD if pos_V is None else x_TD.index_select(0, pos_V)
        V, H, K = x_VD.shape[0], self.heads, self.top_k
        if V > 0:
            scores_VHK, idx_VHK = self.retrieve(x_VD)
            w_VHK = self.retrieval_weights(scores_VHK)
            idx_VR = idx_VHK.reshape(V, H * K)
            # one grouping per forward, shared by every table read
            groups = RowGroups.build(idx_VR, self.num_experts)
            y_VD = self.read_rows(x_VD, idx_VR, w_VHK.reshape(V, H * K), groups)
        else:  # empty or all padding: no retrieval; the empty x_VD keeps the output in x's graph
            idx_VHK = torch.empty(0, H, K, dtype=torch.long, device=x.device)
            w_VHK = x_VD.new_empty(0, H, K)
            groups, y_VD = None, x_VD.mul(0)
        self._record(idx_VHK, w_VHK, pos_V, groups, x_TD, self.should_record())
        y_VD = y_VD.to(x.dtype)
        if pos_V is not None:  # padding rows of the output are zero
            y_VD = x_TD.new_zeros(T, self.d_model).index_copy(0, pos_V, y_VD)
        return y_VD.view(shape)

    # ----------------------------------------------------------------------------- statistics
    @torch.no_grad()
    def _record(
        self,
        idx_VHK: Tensor,
        w_VHK: Tensor,
        pos_V: Tensor | None,
        groups: RowGroups | None,
        x_TD: Tensor,
        record: bool,
    ) -> None:
        """Observer, usage tracker and (if ``record``) ``last_stats``, all over the valid tokens
        only (``pos_V``: their positions in ``x_TD``, None = all), as MoE routers report."""
        V, H, K = idx_VHK.shape
        per_token = H * K
        if self.routing_observer is not None:
            tok_V = torch.arange(V, device=x_TD.device) if pos_V is None else pos_V
            expert_N = idx_VHK.reshape(-1)
            decision = RoutingDecision(
                token_idx_N=tok_V.repeat_interleave(per_token),
                expert_idx_N=expert_N,
                weight_N=w_VHK.detach().reshape(-1),
                tokens_per_expert_E=torch.bincount(expert_N, minlength=self.num_experts),
                num_tokens=x_TD.shape[0],
                num_experts=self.num_experts,
            )
            self.routing_observer(self, decision, x_TD)
        if self.usage_tracker is not None:
            self.usage_tracker.update(idx_VHK, w_VHK.detach())
        if not record:  # decided outside no_grad (should_record looks at grad mode)
            return
        distinct = 0 if groups is None else groups.rows_U.numel()
        dup = torch.tensor(0) if groups is None else groups.repeated_in_token()
        self.last_stats = RoutingStats(
            num_tokens=torch.tensor(V),
            num_experts=self.num_experts,
            distinct_experts=torch.tensor(distinct),
            active_sum=torch.tensor(V * per_token),
            active_min=torch.tensor(per_token),
            active_max=torch.tensor(per_token),
            expert_flops=torch.tensor(V * per_token * self.assignment_flops),
            extra={
                # from the forward's row grouping: no per-token sort of the retrievals
                "duplicate_retrievals": dup,
                "retrievals": torch.tensor(V * per_token),
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
