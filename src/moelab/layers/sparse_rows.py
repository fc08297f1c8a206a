"""Sparse row ops: read retrieved rows of an ``[N, D]`` table and return sparse row gradients.

The two ways a product-key layer reads its tables, each a differentiable ``autograd.Function``:

* :func:`gather_dot` - ``h[t, r] = table[idx[t, r]] · x[t]`` (PEER's ``u_iᵀx``).
* :func:`weighted_row_sum` - ``y[t] = Σ_r w[t, r] · table[idx[t, r]]`` (PEER's ``Σ g·σ(·)·v_i``,
  PKM's ``Σ w·m_i``).

Both are fused: no ``[T, R, D]`` tensor is ever materialised (the gather-dot runs in a C kernel or
in token chunks, the weighted sum and every backward reduction are segment sums over the
retrievals sorted by row, :class:`RowGroups`, in a C kernel or ``F.embedding_bag``). Both return
*sparse, coalesced* row gradients for the table (``sparse=True``), so gradient and optimizer cost
scale with the rows retrieved, not with N.

Shape legend (see ``moelab.layers.base``): N table rows, D row width (model dim), T tokens,
R retrievals per token (H·K for the product-key layers), M = T·R flat retrievals, U distinct rows
retrieved.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from moelab.native import FLOAT_SUFFIX, advise_huge_pages, c_ptr, float_kernel, load_c_kernel

_GATHER_ROWS = 4096  # gathered rows per chunk of gather_dot (4096 x 512 fp32 = 8 MB scratch)

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
    T* ot = out + t * R;                                                                        \
    int64_t r = 0;                                                                              \
    /* four rows at a time: four independent FMA chains share each load of x */              \
    for (; r + 4 <= R; r += 4) {                                                                \
      for (int64_t p = r + 4; p < r + 8 && p < R; ++p) __builtin_prefetch(table + it[p] * D);   \
      const T *a = table + it[r] * D, *b = table + it[r + 1] * D;                               \
      const T *c = table + it[r + 2] * D, *e = table + it[r + 3] * D;                           \
      T s0 = 0, s1 = 0, s2 = 0, s3 = 0;                                                         \
      _Pragma("omp simd reduction(+:s0, s1, s2, s3)")                                           \
      for (int64_t d = 0; d < D; ++d) {                                                         \
        const T xv = xt[d];                                                                     \
        s0 += a[d] * xv; s1 += b[d] * xv; s2 += c[d] * xv; s3 += e[d] * xv;                     \
      }                                                                                         \
      ot[r] = s0; ot[r + 1] = s1; ot[r + 2] = s2; ot[r + 3] = s3;                               \
    }                                                                                           \
    for (; r < R; ++r) {                                                                        \
      const T* row = table + it[r] * D;                                                         \
      T acc = 0;                                                                                \
      _Pragma("omp simd reduction(+:acc)")                                                      \
      for (int64_t d = 0; d < D; ++d) acc += row[d] * xt[d];                                    \
      ot[r] = acc;                                                                              \
    }                                                                                           \
  }                                                                                             \
}                                                                                               \
void segment_sum_##SUF(const T* src, const int64_t* tok, const T* w, const int64_t* ord,      \
                       const int64_t* offsets, T* out, int64_t U, int64_t M, int64_t D,         \
                       int nth) {                                                               \
  _Pragma("omp parallel for num_threads(nth) schedule(static)")                                \
  for (int64_t u = 0; u < U; ++u) {                                                             \
    const int64_t s = offsets[u], e = (u + 1 < U) ? offsets[u + 1] : M;                         \
    T* o = out + u * D;                                                                         \
    for (int64_t d = 0; d < D; ++d) o[d] = 0;                                                   \
    for (int64_t m = s; m < e; ++m) {                                                           \
      const T wm = w[ord[m]];   /* the weights stay in retrieval order: no permuted copy */    \
      const T* sr = src + tok[m] * D;                                                           \
      _Pragma("omp simd")                                                                       \
      for (int64_t d = 0; d < D; ++d) o[d] += wm * sr[d];                                       \
    }                                                                                           \
  }                                                                                             \
}
DEFINE(f32, float)
DEFINE(f64, double)
/* segment_sum_f32 for rows of D % 8 == 0 into 32-byte aligned out: a row retrieved once (most
   rows at 1024² experts) is written as w·src with streaming stores, so that output row is written
   once and not read first (a plain store fetches each line before writing it) and does not evict
   src; longer segments start from their first term (no zero pass) and accumulate in place, in
   the same order as segment_sum_f32 (equal bits). Returns 0 without AVX. */
#ifdef __AVX__
#include <immintrin.h>
int segment_sum_stream_f32(const float* src, const int64_t* tok, const float* w,
                           const int64_t* ord, const int64_t* offsets, float* out, int64_t U,
                           int64_t M, int64_t D, int nth) {
  _Pragma("omp parallel num_threads(nth)")
  {
    _Pragma("omp for schedule(static)")
    for (int64_t u = 0; u < U; ++u) {
      const int64_t s = offsets[u], e = (u + 1 < U) ? offsets[u + 1] : M;
      float* o = out + u * D;
      const float w0 = w[ord[s]];
      const float* s0 = src + tok[s] * D;
      if (e - s == 1) {
        const __m256 wv = _mm256_set1_ps(w0);
        for (int64_t d = 0; d < D; d += 8)
          _mm256_stream_ps(o + d, _mm256_mul_ps(wv, _mm256_loadu_ps(s0 + d)));
        continue;
      }
      _Pragma("omp simd")
      for (int64_t d = 0; d < D; ++d) o[d] = w0 * s0[d];
      for (int64_t m = s + 1; m < e; ++m) {
        const float wm = w[ord[m]];
        const float* sr = src + tok[m] * D;
        _Pragma("omp simd")
        for (int64_t d = 0; d < D; ++d) o[d] += wm * sr[d];
      }
    }
    _mm_sfence();
  }
  return 1;
}
#else
int segment_sum_stream_f32(const float* src, const int64_t* tok, const float* w,
                           const int64_t* ord, const int64_t* offsets, float* out, int64_t U,
                           int64_t M, int64_t D, int nth) { return 0; }
#endif
"""


# Counting sort of the retrievals by row (eager equivalent: a stable sort + unique_consecutive in
# RowGroups.build). starts: N zeroed int64 counters, left holding each row's end. Returns U, the
# number of distinct rows, or -1 if an id is outside [0, N) (the caller falls back to the sort).
_GROUP_C = r"""
#include <stdint.h>
int64_t group_rows(const int64_t* idx, int64_t M, int64_t R, int64_t N, int64_t* starts,
                   int64_t* order, int64_t* tok, int64_t* rows, int64_t* offsets) {
  for (int64_t m = 0; m < M; ++m) {
    const int64_t r = idx[m];
    if (r < 0 || r >= N) return -1;
    starts[r] += 1;
  }
  int64_t U = 0, pos = 0;
  for (int64_t r = 0; r < N; ++r) {
    const int64_t c = starts[r];
    if (c) { rows[U] = r; offsets[U] = pos; ++U; }
    starts[r] = pos;
    pos += c;
  }
  for (int64_t m = 0; m < M; ++m) {   /* in retrieval order: stable */
    const int64_t p = starts[idx[m]]++;
    order[p] = m;
    tok[p] = m / R;
  }
  return U;
}
"""
# The counting sort scans all N counters: worth it while N is not much larger than the number of
# retrievals M (training batches); a decode step of one token (M = H·K) sorts instead.
_COUNTING_SORT_MAX_ROWS_PER_RETRIEVAL = 16
# Mean retrievals per distinct row from which segment sums run in F.embedding_bag (measured
# crossover, 1 thread, D = 128 and 256: the C kernel 2x faster at 4 per row, 1.7x slower at 8).
_BAG_MIN_SEGMENT = 6
# float32 segment sums write rows retrieved once with streaming stores (segment_sum_stream_f32);
# False: the plain kernel (the same bits; the tests compare the two).
_STREAM_STORES = True


def _rows_lib(*tensors: Tensor) -> ctypes.CDLL | None:
    """The fused row kernels when every tensor is a contiguous CPU float32/float64 one."""
    return float_kernel("rows", _ROWS_C, *tensors)


@dataclass(frozen=True)
class RowGroups:
    """Retrievals ``idx_TR`` grouped by table row: the sort every sparse backward reuses.

    ``order_M`` sorts the flat retrievals by row, stably (within a row, by token: the segment sums
    accumulate in token order, and :meth:`repeated_in_token` needs no second sort);
    ``rows_U`` are the distinct rows (ascending);
    ``offsets_U`` start each row's segment in the sorted order; ``tok_M`` is the token of each
    sorted retrieval.
    """

    order_M: Tensor
    tok_M: Tensor
    rows_U: Tensor
    offsets_U: Tensor

    @staticmethod
    def build(idx_TR: Tensor, num_rows: int | None = None) -> RowGroups:
        """Group ``idx_TR`` (ids in ``[0, num_rows)``) by row: a counting sort in C when
        ``num_rows`` is given and not much larger than the number of retrievals, else a stable
        sort. Both give the same groups in the same order."""
        flat = idx_TR.reshape(-1)
        M = flat.numel()
        if (
            num_rows is not None
            and M > 0
            and num_rows <= _COUNTING_SORT_MAX_ROWS_PER_RETRIEVAL * M
            and flat.device.type == "cpu"
            and flat.dtype == torch.int64
        ):
            groups = RowGroups._counting_sort(flat.contiguous(), idx_TR.shape[1], num_rows)
            if groups is not None:
                return groups
        sorted_M, order_M = flat.sort(stable=True)  # measured: as fast as the unstable sort
        rows_U, counts_U = torch.unique_consecutive(sorted_M, return_counts=True)
        offsets_U = counts_U.cumsum(0) - counts_U
        tok_M = torch.div(order_M, idx_TR.shape[1], rounding_mode="floor")
        return RowGroups(order_M, tok_M, rows_U, offsets_U)

    @staticmethod
    def _counting_sort(flat_M: Tensor, R: int, num_rows: int) -> RowGroups | None:
        lib = load_c_kernel("group_rows", _GROUP_C)
        if lib is None:
            return None
        M = flat_M.numel()
        starts = torch.zeros(num_rows, dtype=torch.int64)
        order_M, tok_M = torch.empty(M, dtype=torch.int64), torch.empty(M, dtype=torch.int64)
        rows, offsets = torch.empty(M, dtype=torch.int64), torch.empty(M, dtype=torch.int64)
        lib.group_rows.restype = ctypes.c_int64
        U = lib.group_rows(
            c_ptr(flat_M),
            ctypes.c_int64(M),
            ctypes.c_int64(R),
            ctypes.c_int64(num_rows),
            *(c_ptr(t) for t in (starts, order_M, tok_M, rows, offsets)),
        )
        if U < 0:  # an id out of range: let the sort path handle (and index errors report) it
            return None
        return RowGroups(order_M, tok_M, rows[:U], offsets[:U])

    def repeated_in_token(self) -> Tensor:
        """Number of retrievals (long scalar) that repeat a row their token already retrieved.

        The stable sort puts one token's retrievals of a row next to each other, so these are the
        sorted neighbours with the same token inside one row's segment; equals
        ``duplicated_retrievals(idx).sum()`` without sorting each token's retrievals again.
        """
        M = self.tok_M.numel()
        if M < 2:
            return torch.zeros((), dtype=torch.long, device=self.tok_M.device)
        same = self.tok_M[1:] == self.tok_M[:-1]
        same[self.offsets_U[1:] - 1] = False  # neighbours across a row boundary
        return same.sum()

    def row_sums(self, weight_TR: Tensor, src_TD: Tensor) -> Tensor:
        """``out[u] = Σ_{(t,r): idx[t,r] = rows[u]} weight[t,r] · src[t]`` as ``[U, D]`` (fused).

        Long segments (rows retrieved by many tokens: small tables, big batches) run in
        ``F.embedding_bag`` (FBGEMM keeps a row's sum in registers along its segment; 2-3x the C
        kernel at 16+ retrievals per row), short ones in the C kernel (no permuted weight copy,
        no per-bag overhead; 2-4x embedding_bag at 1-4 per row, docs/peer.md), float32 rows of
        ``D % 8 == 0`` writing rows retrieved once with streaming stores (0.6x the time at
        1024², D 512, where most rows are retrieved once: the output is not read first).
        """
        w_flat = weight_TR.reshape(-1).contiguous()
        src_TD = src_TD.contiguous()
        U, M = self.rows_U.numel(), w_flat.numel()
        lib = _rows_lib(src_TD, w_flat) if M < _BAG_MIN_SEGMENT * U else None
        if lib is not None:
            D = src_TD.shape[1]
            out = advise_huge_pages(torch.empty(U, D, dtype=src_TD.dtype))
            args = (
                c_ptr(src_TD),
                c_ptr(self.tok_M),
                c_ptr(w_flat),
                c_ptr(self.order_M),
                c_ptr(self.offsets_U),
                c_ptr(out),
                ctypes.c_int64(U),
                ctypes.c_int64(M),
                ctypes.c_int64(D),
                ctypes.c_int(torch.get_num_threads()),
            )
            streams = (
                _STREAM_STORES
                and src_TD.dtype == torch.float32
                and D % 8 == 0
                and out.data_ptr() % 32 == 0
            )
            if not (streams and lib.segment_sum_stream_f32(*args)):
                getattr(lib, f"segment_sum_{FLOAT_SUFFIX[src_TD.dtype]}")(*args)
            return out
        return F.embedding_bag(
            self.tok_M,
            src_TD,
            self.offsets_U,
            mode="sum",
            per_sample_weights=w_flat.index_select(0, self.order_M),
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
        getattr(lib, f"gather_dot_{FLOAT_SUFFIX[table_ND.dtype]}")(
            c_ptr(table_ND),
            c_ptr(idx_TR),
            c_ptr(x_TD),
            c_ptr(out_TR),
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
    """:func:`gather_dot`; backward: row sums for the table, an embedding bag for ``x``."""

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
    """:func:`weighted_row_sum`; backward: row sums for the table, a gather-dot for ``w``."""

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
