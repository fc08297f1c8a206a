"""PKM: Product Key Memory (Lample et al. 2019, "Large Memory Layers with Product Keys").

``m(x) = Σ_{h=1..H} Σ_{i ∈ topk_h(x)} w_i(x) · m_i`` with ``w = softmax`` over the k retrieved
scores of head h (Lample et al. §3.2, eq. 2-4) and one value table ``m: [N, D]`` shared by the
heads. Each head has its own query network and its own sub-key sets (§3.3, multi-head memory);
queries are batch-normalised (§3.4). Baseline of PEER (N = 1024², H = 8, k = 32).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from moelab.layers.product_key_layer import ProductKeyLayer
from moelab.layers.sparse_rows import RowGroups, weighted_row_sum


class PKM(ProductKeyLayer):
    """Product-key memory, a drop-in for an FFN: ``y = pkm(x, token_mask=None)``.

    Args mirror :class:`moelab.layers.peer.PEER`: ``num_memories`` (perfect square N), ``heads``,
    ``top_k`` (<= √N), ``d_key`` (even; default 256), ``query_batchnorm``, ``init_std`` (values:
    N(0, init_std); Lample uses N(0, D^-1/2)), ``sparse_grad``, ``check_memory``. Statistics and
    usage tracking have PEER's semantics with ``z'_i = Σ_x w_i(x)`` (both come from
    :class:`~moelab.layers.product_key_layer.ProductKeyLayer`).
    """

    keys_name = "num_memories"

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
        super().__init__(
            d_model, num_memories, heads=heads, top_k=top_k, d_key=d_key, sparse_grad=sparse_grad
        )
        if init_std is not None and init_std <= 0:
            raise ValueError(f"init_std must be > 0 or None, got {init_std!r}")
        self.num_memories = self.num_experts  # int(num_memories), checked by the base class
        self.init_std = self.d_model**-0.5 if init_std is None else init_std
        self._build_retrieval(
            tables=1,
            shared_keys=False,
            query_batchnorm=query_batchnorm,
            check_memory=check_memory,
            device=device,
            dtype=dtype,
        )
        self.values = self._new_table(device, dtype)
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

    def retrieval_weights(self, scores_THK: Tensor) -> Tensor:
        """Softmax over each head's k scores (Lample et al. eq. 3)."""
        return scores_THK.softmax(dim=-1)

    def read_rows(self, x_TD: Tensor, idx_TR: Tensor, w_TR: Tensor, groups: RowGroups) -> Tensor:
        """``Σ_r w_r · m_r`` over the retrieved memories (Lample et al. §3.2)."""
        return weighted_row_sum(self.values, idx_TR, w_TR, groups, self.sparse_grad)
