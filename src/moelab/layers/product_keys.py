"""Product-key retrieval and sparse row ops shared by PEER and PKM.

* :func:`product_key_topk` - exact top-k over N = S² product keys at cost O((S + k²)·d_key)
  (Lample et al. 2019, "Large Memory Layers with Product Keys", §3.2; PEER, He 2024, §2).
* :func:`gather_dot` / :func:`weighted_row_sum` - the two ways a layer reads retrieved rows of a
  ``[N, D]`` table. Both are fused (no ``[T, H·K, D]`` tensor is ever materialised: the gather-dot
  runs in token chunks, the weighted sum and every backward reduction are ``F.embedding_bag``) and
  both return *sparse, coalesced* row gradients for the table (``sparse=True``), so gradient and
  optimizer cost scale with the rows retrieved, not with N.
* :class:`UsageTracker` - PEER's expert usage and unevenness (PEER §3.3) and head duplication.
* Argument validation shared by both layers.

The C kernel loader, huge pages and the memory check live in :mod:`moelab.native`.

Shape legend (see ``moelab.layers.base``): T tokens, D model dim, H heads, K top-k, S sub-keys per
half (√N), C = K² candidates, R = H·K retrievals per token, U distinct rows retrieved.
"""

from __future__ import annotations

import ctypes
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moelab.native import advise_huge_pages, load_c_kernel

_GATHER_ROWS = 4096  # gathered rows per chunk of gather_dot (4096 x 512 fp32 = 8 MB scratch)


# --------------------------------------------------------------------------- validation


def check_product_key_args(
    *, num_keys: int, top_k: int, d_key: int, heads: int, keys_name: str
) -> int:
    """Validate product-key hyper-parameters; return S = √N. Errors name the argument."""
    if not isinstance(num_keys, int) or num_keys < 1:
        raise ValueError(
            f"{keys_name} must be a positive perfect square (e.g. 1024**2), got {num_keys!r}"
        )
    s = math.isqrt(num_keys)
    if s * s != num_keys:
        raise ValueError(
            f"{keys_name} must be a perfect square (product keys use √{keys_name} sub-keys per "
            f"half), got {num_keys}; nearest allowed values: {s * s} or {(s + 1) ** 2}"
        )
    if not isinstance(top_k, int) or top_k < 1 or top_k > s:
        raise ValueError(f"top_k must be an integer in [1, √{keys_name}] = [1, {s}], got {top_k!r}")
    if not isinstance(d_key, int) or d_key < 2 or d_key % 2:
        raise ValueError(
            f"d_key must be an even integer >= 2 (split into two halves), got {d_key!r}"
        )
    if not isinstance(heads, int) or heads < 1:
        raise ValueError(f"heads must be an integer >= 1, got {heads!r}")
    return s


# --------------------------------------------------------------------------- queries and retrieval


def normalize_queries(bn: nn.BatchNorm1d | None, q_TC: Tensor, mask_T: Tensor | None) -> Tensor:
    """Batch-norm the queries (PEER §2, "query batch normalisation") using valid tokens only.

    Padding rows are normalised with the running statistics and never update them.
    """
    if bn is None:
        return q_TC
    if mask_T is None or not bn.training or bool(mask_T.all()):
        return bn(q_TC)
    out = torch.empty_like(q_TC)
    out[mask_T] = bn(q_TC[mask_T])
    out[~mask_T] = F.batch_norm(
        q_TC[~mask_T], bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.0, bn.eps
    )
    return out


def topk_last_dim(x: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """``x.topk(k, dim=-1)`` (descending, first index wins ties) via a fused C selection kernel.

    An insertion-sorted buffer of k per row: each of the S entries costs one comparison with the
    current k-th value (most are rejected), about 10x faster than ``torch.topk`` here. Falls back
    to ``torch.topk`` without the kernel or when ``x`` needs a gradient. Unlike ``torch.topk``, a
    NaN is never selected (scores of finite queries and keys are finite).
    """
    x = x.contiguous()
    lib = _rows_lib(x)
    if lib is None or x.requires_grad:
        return x.topk(k, dim=-1)
    S = x.shape[-1]
    rows = x.numel() // S
    v = torch.empty(*x.shape[:-1], k, dtype=x.dtype)
    i = torch.empty(*x.shape[:-1], k, dtype=torch.int64)
    getattr(lib, f"topk_rows_{_C_SUFFIX[x.dtype]}")(
        _ptr(x),
        ctypes.c_int64(rows),
        ctypes.c_int64(S),
        ctypes.c_int64(k),
        _ptr(v),
        _ptr(i),
        ctypes.c_int(torch.get_num_threads()),
    )
    return v, i


class _HalfTopK(torch.autograd.Function):
    """Top-k of ``q·c`` over one half's S sub-keys, batched over (head, half) pairs.

    Same values/indices as ``torch.bmm(q, keysᵀ).topk(k)`` but the backward only touches the k
    selected sub-keys per row (O(T·k·d) instead of two dense O(T·S·d) matmuls and a dense
    ``[B, T, S]`` zero-filled score gradient).
    """

    @staticmethod
    def forward(ctx, q_BTd, keys_BSd, k):  # noqa: ANN001, ANN205
        scores_BTS = torch.bmm(q_BTd, keys_BSd.transpose(1, 2))
        top_v, top_i = topk_last_dim(scores_BTS, k)
        ctx.save_for_backward(q_BTd, keys_BSd, top_i)
        ctx.mark_non_differentiable(top_i)
        return top_v, top_i

    @staticmethod
    def backward(ctx, g_BTk, _g_idx):  # noqa: ANN001, ANN205
        q_BTd, keys_BSd, top_i = ctx.saved_tensors
        g_BTk = g_BTk.to(keys_BSd.dtype).contiguous()  # (autocast: scores may be lower precision)
        g_q = g_keys = None
        if ctx.needs_input_grad[0]:  # dq[b,t] = Σ_k g[b,t,k] · c_b[i[b,t,k]]
            g_q = torch.stack(
                [
                    F.embedding_bag(top_i[b], keys_BSd[b], mode="sum", per_sample_weights=g_BTk[b])
                    for b in range(q_BTd.shape[0])
                ]
            ).to(q_BTd.dtype)
        if ctx.needs_input_grad[1]:  # dc_b[s] = Σ_{(t,k): i[b,t,k]=s} g[b,t,k] · q[b,t]
            g_keys = torch.zeros_like(keys_BSd)
            q_BTd = q_BTd.to(keys_BSd.dtype)
            for b in range(top_i.shape[0]):  # segment sums over the sorted selections (fused)
                groups = RowGroups.build(top_i[b], keys_BSd.shape[1])
                g_keys[b].index_copy_(0, groups.rows_U, groups.row_sums(g_BTk[b], q_BTd[b]))
        return g_q, g_keys, None


def product_key_topk(q_THK: Tensor, sub_keys: Tensor, top_k: int) -> tuple[Tensor, Tensor]:
    """Exact top-k of ``q·key_n`` over the N = S² product keys ``key_{i·S+j} = [c_i ; c'_j]``.

    Lample et al. 2019, §3.2 (used unchanged by PEER): split the query into halves ``q1, q2``;
    take the top-k of ``q1·C`` and of ``q2·C'``; the top-k of all N sums lies among the k×k sums of
    those candidates, so a second top-k over the C = k² sums is exact. Grid positions ``(a, b)`` of
    the second top-k are mapped back to sub-key ids and then to the expert id ``i·S + j``
    (PITFALLS: returning the grid position instead is a known bug).

    Args:
        q_THK: queries ``[T, H, d_key]`` (d_key here is the full key size).
        sub_keys: ``[Hk, 2, S, d_key/2]`` with ``Hk`` = 1 (keys shared by heads, PEER) or H (PKM).
        top_k: k.

    Returns:
        ``scores_THK`` (differentiable w.r.t. queries and keys) and long ``idx_THK`` in ``[0, S²)``,
        both sorted by descending score.
    """
    T, H, d_key = q_THK.shape
    S, half = sub_keys.shape[-2], sub_keys.shape[-1]
    keys = sub_keys.expand(H, 2, S, half) if sub_keys.shape[0] == 1 else sub_keys
    q_BTd = q_THK.view(T, H * 2, half).transpose(0, 1)  # B = (head, half) pairs
    top_v, top_i = _HalfTopK.apply(q_BTd, keys.reshape(H * 2, S, half), top_k)  # [B, T, k]
    top_v = top_v.view(H, 2, T, top_k)
    top_i = top_i.view(H, 2, T, top_k)
    cand_HTKK = top_v[:, 0, :, :, None] + top_v[:, 1, :, None, :]  # [H, T, k, k]
    best_v, pos = cand_HTKK.flatten(-2).topk(top_k, dim=-1)  # [H, T, k], grid positions in [0, k²)
    i = top_i[:, 0].gather(-1, pos // top_k)
    j = top_i[:, 1].gather(-1, pos % top_k)
    idx = i * S + j
    return best_v.permute(1, 0, 2), idx.permute(1, 0, 2)


def duplicated_retrievals(idx_THK: Tensor) -> Tensor:
    """Per token, retrievals (over all heads) that repeat an expert already retrieved by another
    head (within one head the k ids are distinct). Returns long ``[T]``."""
    T = idx_THK.shape[0]
    s = idx_THK.reshape(T, -1).sort(dim=-1).values
    return (s[:, 1:] == s[:, :-1]).sum(-1)


# --------------------------------------------------------------------------- sparse row ops

# Fused row kernels (eager equivalents: _gather_dot_eager, F.embedding_bag in RowGroups.row_sums).
_ROWS_C = r"""
#include <stdint.h>
#define DEFINE(SUF, T)                                                                          \
void gather_dot_##SUF(const T* table, const int64_t* idx, const T* x, T* out, int64_t n_tok,  \
                      int64_t R, int64_t D, int nth) {                                          \
  _Pragma("omp parallel for num_threads(nth) schedule(static)")                                \
  for (int64_t t = 0; t < n_tok; ++t) {                                                         \
    const T* xt = x + t * D;                                                                    \
    const int64_t* it = idx + t * R;                                                            \
    for (int64_t r = 0; r < R; ++r) {                                                           \
      if (r + 4 < R) __builtin_prefetch(table + it[r + 4] * D);                                 \
      const T* row = table + it[r] * D;                                                         \
      T acc = 0;                                                                                \
      _Pragma("omp simd reduction(+:acc)")                                                      \
      for (int64_t d = 0; d < D; ++d) acc += row[d] * xt[d];                                    \
      out[t * R + r] = acc;                                                                     \
    }                                                                                           \
  }                                                                                             \
}                                                                                               \
void segment_sum_##SUF(const T* src, const int64_t* tok, const T* w, const int64_t* offsets,  \
                       T* out, int64_t U, int64_t M, int64_t D, int nth) {                      \
  _Pragma("omp parallel for num_threads(nth) schedule(static)")                                \
  for (int64_t u = 0; u < U; ++u) {                                                             \
    const int64_t s = offsets[u], e = (u + 1 < U) ? offsets[u + 1] : M;                         \
    T* o = out + u * D;                                                                         \
    for (int64_t d = 0; d < D; ++d) o[d] = 0;                                                   \
    for (int64_t m = s; m < e; ++m) {                                                           \
      const T wm = w[m];                                                                        \
      const T* sr = src + tok[m] * D;                                                           \
      _Pragma("omp simd")                                                                       \
      for (int64_t d = 0; d < D; ++d) o[d] += wm * sr[d];                                       \
    }                                                                                           \
  }                                                                                             \
}
DEFINE(f32, float)
DEFINE(f64, double)
#define DEFINE_TOPK(SUF, T)                                                                     \
void topk_rows_##SUF(const T* s, int64_t rows, int64_t S, int64_t k, T* out_v, int64_t* out_i, \
                     int nth) {                                                                 \
  _Pragma("omp parallel for num_threads(nth) schedule(static)")                                \
  for (int64_t r = 0; r < rows; ++r) {                                                          \
    const T* x = s + r * S;                                                                     \
    T* v = out_v + r * k;                                                                       \
    int64_t* ix = out_i + r * k;                                                                \
    int64_t n = 0;                                                                              \
    for (int64_t j = 0; j < S; ++j) {                                                           \
      const T xj = x[j];                                                                        \
      if (n == k && !(xj > v[k - 1])) continue;                                                 \
      int64_t p = n < k ? n++ : k - 1;                                                          \
      while (p > 0 && v[p - 1] < xj) { v[p] = v[p - 1]; ix[p] = ix[p - 1]; --p; }               \
      v[p] = xj; ix[p] = j;                                                                     \
    }                                                                                           \
  }                                                                                             \
}
DEFINE_TOPK(f32, float)
DEFINE_TOPK(f64, double)
"""
_C_SUFFIX = {torch.float32: "f32", torch.float64: "f64"}


def _rows_lib(*tensors: Tensor) -> ctypes.CDLL | None:
    """The fused row kernels when every tensor is a contiguous CPU float32/float64 one."""
    t0 = tensors[0]
    if t0.device.type != "cpu" or t0.dtype not in _C_SUFFIX:
        return None
    if any(t.dtype != t0.dtype or not t.is_contiguous() for t in tensors):
        return None
    return load_c_kernel("rows", _ROWS_C)


def _ptr(t: Tensor) -> ctypes.c_void_p:
    return ctypes.c_void_p(t.data_ptr())


@dataclass(frozen=True)
class RowGroups:
    """Retrievals ``idx_TR`` grouped by table row: the sort every sparse backward reuses.

    ``order_M`` sorts the flat retrievals by row; ``rows_U`` are the distinct rows (ascending);
    ``offsets_U`` start each row's segment in the sorted order; ``tok_M`` is the token of each
    sorted retrieval.
    """

    order_M: Tensor
    tok_M: Tensor
    rows_U: Tensor
    offsets_U: Tensor
    num_rows: int

    @staticmethod
    def build(idx_TR: Tensor, num_rows: int) -> RowGroups:
        flat = idx_TR.reshape(-1)
        sorted_M, order_M = flat.sort()
        rows_U, counts_U = torch.unique_consecutive(sorted_M, return_counts=True)
        offsets_U = counts_U.cumsum(0) - counts_U
        tok_M = torch.div(order_M, idx_TR.shape[1], rounding_mode="floor")
        return RowGroups(order_M, tok_M, rows_U, offsets_U, num_rows)

    def row_sums(self, weight_TR: Tensor, src_TD: Tensor) -> Tensor:
        """``out[u] = Σ_{(t,r): idx[t,r] = rows[u]} weight[t,r] · src[t]`` as ``[U, D]`` (fused)."""
        w_M = weight_TR.reshape(-1)[self.order_M].contiguous()
        src_TD = src_TD.contiguous()
        lib = _rows_lib(src_TD, w_M)
        if lib is not None:
            U, D = self.rows_U.numel(), src_TD.shape[1]
            out = advise_huge_pages(torch.empty(U, D, dtype=src_TD.dtype))
            getattr(lib, f"segment_sum_{_C_SUFFIX[src_TD.dtype]}")(
                _ptr(src_TD),
                _ptr(self.tok_M),
                _ptr(w_M),
                _ptr(self.offsets_U),
                _ptr(out),
                ctypes.c_int64(U),
                ctypes.c_int64(w_M.numel()),
                ctypes.c_int64(D),
                ctypes.c_int(torch.get_num_threads()),
            )
            return out
        return F.embedding_bag(
            self.tok_M,
            src_TD,
            self.offsets_U,
            mode="sum",
            per_sample_weights=w_M,
        )

    def table_grad(self, weight_TR: Tensor, src_TD: Tensor, like: Tensor, sparse: bool) -> Tensor:
        """Gradient of ``table`` for rows read with weights: sparse coalesced or dense."""
        vals_UD = self.row_sums(weight_TR, src_TD).to(like.dtype)
        if sparse:
            return torch.sparse_coo_tensor(
                self.rows_U[None], vals_UD, like.shape, is_coalesced=True, check_invariants=False
            )
        return torch.zeros_like(like).index_copy_(0, self.rows_U, vals_UD)


def _gather_dot_impl(table_ND: Tensor, idx_TR: Tensor, x_TD: Tensor) -> Tensor:
    """``out[t, r] = table[idx[t, r]] · x[t]``: fused C kernel, else eager token chunks."""
    x_TD = x_TD.contiguous()
    idx_TR = idx_TR.contiguous()
    lib = _rows_lib(table_ND, x_TD) if idx_TR.dtype == torch.int64 else None
    if lib is not None:
        T, R = idx_TR.shape
        out_TR = torch.empty(T, R, dtype=table_ND.dtype)
        getattr(lib, f"gather_dot_{_C_SUFFIX[table_ND.dtype]}")(
            _ptr(table_ND),
            _ptr(idx_TR),
            _ptr(x_TD),
            _ptr(out_TR),
            ctypes.c_int64(T),
            ctypes.c_int64(R),
            ctypes.c_int64(table_ND.shape[1]),
            ctypes.c_int(torch.get_num_threads()),
        )
        return out_TR
    return _gather_dot_eager(table_ND, idx_TR, x_TD)


def _gather_dot_eager(table_ND: Tensor, idx_TR: Tensor, x_TD: Tensor) -> Tensor:
    """Eager ``table[idx]·x`` in token chunks (bounded scratch, never a [T, R, D] tensor)."""
    T, R = idx_TR.shape
    D = table_ND.shape[1]
    out_TR = torch.empty(T, R, dtype=table_ND.dtype, device=table_ND.device)
    chunk = max(1, _GATHER_ROWS // R)
    buf = torch.empty(min(chunk, T) * R, D, dtype=table_ND.dtype, device=table_ND.device)
    for s in range(0, T, chunk):
        e = min(T, s + chunk)
        rows = buf[: (e - s) * R]
        torch.index_select(table_ND, 0, idx_TR[s:e].reshape(-1), out=rows)
        torch.sum(rows.view(e - s, R, D) * x_TD[s:e, None, :], dim=-1, out=out_TR[s:e])
    return out_TR


class _GatherDot(torch.autograd.Function):
    @staticmethod
    def forward(ctx, table_ND, idx_TR, x_TD, groups, sparse):  # noqa: ANN001, ANN205
        ctx.save_for_backward(table_ND, idx_TR, x_TD)
        ctx.groups, ctx.sparse = groups, sparse
        return _gather_dot_impl(table_ND, idx_TR, x_TD.to(table_ND.dtype))

    @staticmethod
    def backward(ctx, grad_TR):  # noqa: ANN001, ANN205
        table_ND, idx_TR, x_TD = ctx.saved_tensors
        grad_TR = grad_TR.contiguous()
        g_table = g_x = None
        if ctx.needs_input_grad[0]:
            g_table = ctx.groups.table_grad(grad_TR, x_TD.to(table_ND.dtype), table_ND, ctx.sparse)
        if ctx.needs_input_grad[2]:  # dx[t] = Σ_r grad[t,r] · table[idx[t,r]]
            g_x = F.embedding_bag(idx_TR, table_ND, mode="sum", per_sample_weights=grad_TR)
            g_x = g_x.to(x_TD.dtype)
        return g_table, None, g_x, None, None


class _WeightedRowSum(torch.autograd.Function):
    @staticmethod
    def forward(ctx, table_ND, idx_TR, w_TR, groups, sparse):  # noqa: ANN001, ANN205
        ctx.save_for_backward(table_ND, idx_TR, w_TR)
        ctx.groups, ctx.sparse = groups, sparse
        return F.embedding_bag(idx_TR, table_ND, mode="sum", per_sample_weights=w_TR)

    @staticmethod
    def backward(ctx, grad_TD):  # noqa: ANN001, ANN205
        table_ND, idx_TR, w_TR = ctx.saved_tensors
        grad_TD = grad_TD.contiguous()
        g_table = g_w = None
        if ctx.needs_input_grad[0]:
            g_table = ctx.groups.table_grad(w_TR, grad_TD, table_ND, ctx.sparse)
        if ctx.needs_input_grad[2]:  # dw[t,r] = table[idx[t,r]] · grad[t]
            g_w = _gather_dot_impl(table_ND, idx_TR, grad_TD)
        return g_table, None, g_w, None, None


def gather_dot(
    table_ND: Tensor, idx_TR: Tensor, x_TD: Tensor, groups: RowGroups, sparse: bool = True
) -> Tensor:
    """``h[t, r] = table[idx[t, r]] · x[t]`` (PEER's ``u_iᵀx``); differentiable in table and x."""
    return _GatherDot.apply(table_ND, idx_TR, x_TD, groups, sparse)


def weighted_row_sum(
    table_ND: Tensor, idx_TR: Tensor, w_TR: Tensor, groups: RowGroups, sparse: bool = True
) -> Tensor:
    """``y[t] = Σ_r w[t, r] · table[idx[t, r]]`` (PEER's ``Σ g·σ(·)·v_i``, PKM's ``Σ w·m_i``)."""
    return _WeightedRowSum.apply(table_ND, idx_TR, w_TR.to(table_ND.dtype), groups, sparse)


# --------------------------------------------------------------------------- usage statistics


def usage_and_unevenness(z_prime_N: Tensor) -> tuple[float, float]:
    """PEER §3.3: usage = fraction of experts with ``z'_i ≠ 0``; unevenness = ``log N + Σ z log z``
    with ``z = z'/‖z'‖₁`` (0·log 0 = 0). Unevenness is 0 for perfectly even use, log N at worst."""
    n = z_prime_N.numel()
    z = z_prime_N.double()
    total = z.abs().sum()
    usage = float((z != 0).sum()) / n
    if total == 0:
        return usage, float("nan")
    z = z.abs() / total
    nz = z[z > 0]
    return usage, float(math.log(n) + (nz * nz.log()).sum())


class UsageTracker:
    """Evaluation accumulator of ``z'_i = Σ_x g_i(x)`` and head duplication over a pass."""

    def __init__(self, num_experts: int, device: torch.device | str = "cpu") -> None:
        self.z_prime = torch.zeros(num_experts, dtype=torch.float64, device=device)
        self.tokens = 0
        self.retrievals = 0
        self.duplicates = 0

    @torch.no_grad()
    def update(self, idx_THK: Tensor, gate_THK: Tensor) -> None:
        """Add one forward's valid tokens (already masked) to the totals."""
        self.z_prime.index_add_(0, idx_THK.reshape(-1), gate_THK.reshape(-1).double())
        self.tokens += int(idx_THK.shape[0])
        self.retrievals += int(idx_THK.numel())
        self.duplicates += int(duplicated_retrievals(idx_THK).sum())

    def report(self) -> dict[str, float]:
        usage, unevenness = usage_and_unevenness(self.z_prime)
        dup = self.duplicates / self.retrievals if self.retrievals else float("nan")
        return {
            "usage": usage,
            "unevenness": unevenness,
            "duplicate_fraction": dup,
            "tokens": float(self.tokens),
            "num_experts": float(self.z_prime.numel()),
        }
