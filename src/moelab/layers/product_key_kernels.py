"""The C kernels of product-key retrieval, each with an eager fallback that gives the same result.

* :func:`topk_last_dim` - per-row top-k (the half top-k over S sub-key scores);
* :func:`pair_topk` - the second top-k, over listed pairs of the two halves' sorted top-k lists;
* :func:`subkey_grads` - the half top-k's backward: gradients of the queries and of the sub-keys
  from the k selected sub-keys per row, without sorting the selections or a dense ``[B, T, S]``
  gradient.

NaN scores cannot be ranked; every selection raises :class:`NaNScoresError` on them, on every path.

Shape legend (see ``moelab.layers.base``): B (head, half) pairs, T tokens, K selections per row,
S sub-keys per half, d half-key size, C listed pairs.
"""

from __future__ import annotations

import ctypes

import torch
import torch.nn.functional as F
from torch import Tensor

from moelab.layers.sparse_rows import RowGroups
from moelab.layers.topk_avx2 import NET_MAX_S, avx2_topk_lib
from moelab.native import FLOAT_SUFFIX, c_ptr, float_kernel

# Top-k selection per row (eager equivalent: torch.topk); see topk_last_dim. Returns the number of
# rows holding a NaN (the caller raises): a NaN cannot be ranked, and inserted among the first k
# entries it would sit in the buffer and block larger values. pair_topk_*: the same selection over
# the pair sums v0[pa[c]] + v1[pb[c]] of C listed pairs, computed on the fly (no candidate tensor);
# it writes the k best pair numbers c (the first listed pair wins a tie). The pairs are listed in
# grid order and both lists are sorted, so a rejected sum ends its row (later ones are no higher
# and listed later) and a rejected row start ends the search. Its NaN check is up front: a NaN sum
# exists iff a list holds NaN or +inf meets -inf at (0, K-1) or (K-1, 0), both always listed.
_TOPK_C = r"""
#include <stdint.h>
#define DEFINE_TOPK(SUF, T)                                                                     \
int64_t topk_rows_##SUF(const T* s, int64_t rows, int64_t S, int64_t k, T* out_v,             \
                        int64_t* out_i, int nth) {                                              \
  int64_t nan_rows = 0;                                                                         \
  _Pragma("omp parallel for num_threads(nth) schedule(static) reduction(+:nan_rows)")          \
  for (int64_t r = 0; r < rows; ++r) {                                                          \
    const T* x = s + r * S;                                                                     \
    T* v = out_v + r * k;                                                                       \
    int64_t* ix = out_i + r * k;                                                                \
    int64_t n = 0, nan = 0;                                                                     \
    for (int64_t j = 0; j < S; ++j) {                                                           \
      const T xj = x[j];                                                                        \
      if (n == k && xj <= v[k - 1]) continue;   /* false for NaN: it takes the next test */    \
      if (xj != xj) { nan = 1; continue; }                                                      \
      int64_t p = n < k ? n++ : k - 1;                                                          \
      while (p > 0 && v[p - 1] < xj) { v[p] = v[p - 1]; ix[p] = ix[p - 1]; --p; }               \
      v[p] = xj; ix[p] = j;                                                                     \
    }                                                                                           \
    nan_rows += nan;                                                                            \
  }                                                                                             \
  return nan_rows;                                                                              \
}                                                                                               \
int64_t pair_topk_##SUF(const T* v0, const T* v1, const int64_t* pa, const int64_t* pb,       \
                        int64_t rows, int64_t K, int64_t C, int64_t k, T* buf_v,                \
                        int64_t* out_p, const int64_t* i0, const int64_t* i1, int64_t S,        \
                        int64_t* out_a, int64_t* out_b, int64_t* out_id, int nth) {             \
  int64_t nan_rows = 0;                                                                         \
  _Pragma("omp parallel for num_threads(nth) schedule(static) reduction(+:nan_rows)")          \
  for (int64_t r = 0; r < rows; ++r) {                                                          \
    const T* x0 = v0 + r * K;                                                                   \
    const T* x1 = v1 + r * K;                                                                   \
    T* v = buf_v + r * k;                                                                       \
    int64_t* ix = out_p + r * k;                                                                \
    int64_t n = 0, nan = 0, skip_a = -1;                                                        \
    for (int64_t j = 0; j < K; ++j) nan |= (x0[j] != x0[j]) | (x1[j] != x1[j]);                 \
    nan |= (x0[0] > 0 && x0[0] * 0 != 0 && x1[K - 1] < 0 && x1[K - 1] * 0 != 0);                \
    nan |= (x1[0] > 0 && x1[0] * 0 != 0 && x0[K - 1] < 0 && x0[K - 1] * 0 != 0);                \
    if (nan) { nan_rows += 1; for (int64_t j = 0; j < k; ++j) ix[j] = 0; goto ids; }            \
    for (int64_t c = 0; c < C; ++c) {                                                           \
      if (pa[c] == skip_a) continue;                                                            \
      const T xj = x0[pa[c]] + x1[pb[c]];                                                       \
      if (n == k && xj <= v[k - 1]) {                                                           \
        if (pb[c] == 0) break;  /* every later row starts lower: nothing left can enter */      \
        skip_a = pa[c];         /* the rest of this row is lower still */                       \
        continue;                                                                               \
      }                                                                                         \
      int64_t p = n < k ? n++ : k - 1;                                                          \
      while (p > 0 && v[p - 1] < xj) { v[p] = v[p - 1]; ix[p] = ix[p - 1]; --p; }               \
      v[p] = xj; ix[p] = c;                                                                     \
    }                                                                                           \
  ids:                                                                                          \
    if (out_a) for (int64_t j = 0; j < k; ++j) {  /* pair -> grid (a, b) -> expert id */       \
      const int64_t a = pa[ix[j]], b = pb[ix[j]];                                               \
      out_a[r * k + j] = a; out_b[r * k + j] = b;                                               \
      out_id[r * k + j] = i0[r * K + a] * S + i1[r * K + b];                                    \
    }                                                                                           \
  }                                                                                             \
  return nan_rows;                                                                              \
}
DEFINE_TOPK(f32, float)
DEFINE_TOPK(f64, double)
"""


class NaNScoresError(ValueError):
    """Product-key retrieval met NaN scores (NaN or inf in the queries or sub-keys).

    A NaN cannot be ranked: ``torch.topk`` selects it first while an insertion buffer may keep or
    skip it, so the two paths would retrieve different rows. Both raise this instead.
    """


def _nan_error(rows: int, total: int) -> NaNScoresError:
    return NaNScoresError(
        f"product-key retrieval got NaN scores in {rows} of {total} rows: the queries or sub-keys "
        f"hold NaN/inf (diverged training, or NaN input); NaN scores cannot be ranked"
    )


def topk_last_dim(x: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """``x.topk(k, dim=-1)`` (descending, first index wins ties) via a fused C selection kernel.

    An insertion-sorted buffer of k per row: each of the S entries costs one comparison with the
    current k-th value (most are rejected), about 10x faster than ``torch.topk`` here; float32 rows
    of S <= 128 take a branch-free sorting network over 8 rows at a time instead (6x faster than
    the buffer at S = 64, k = 36, where most entries enter the buffer), and longer float32 rows
    test 8 entries at a time against the k-th value before the buffer sees them. Falls back
    to ``torch.topk`` without the kernel or when ``x`` needs a gradient. A NaN anywhere in ``x``
    raises :class:`NaNScoresError` on both paths (``torch.topk`` would select it first, the buffer
    could not rank it).
    """
    x = x.contiguous()
    lib = float_kernel("topk", _TOPK_C, x)
    if lib is None or x.requires_grad:
        v, i = x.topk(k, dim=-1)
        # torch.topk ranks NaN above everything: a row with a NaN has one among its top k
        if x.numel() and bool(v.detach().isnan().any()):
            nan_rows = int(v.detach().isnan().any(-1).sum())
            raise _nan_error(nan_rows, x.numel() // x.shape[-1])
        return v, i
    S = x.shape[-1]
    rows = x.numel() // S if S else 0
    v = torch.empty(*x.shape[:-1], k, dtype=x.dtype)
    i = torch.empty(*x.shape[:-1], k, dtype=torch.int64)
    fn = getattr(lib, f"topk_rows_{FLOAT_SUFFIX[x.dtype]}")
    shape = [ctypes.c_int64(rows), ctypes.c_int64(S), ctypes.c_int64(k)]
    avx2 = avx2_topk_lib() if x.dtype == torch.float32 and S > 0 else None
    if avx2 is not None and S <= NET_MAX_S:
        fn = avx2.topk_net_f32
        shape.insert(2, ctypes.c_int64(1 << (S - 1).bit_length()))  # S padded to a power of 2
    elif avx2 is not None:
        fn = avx2.topk_scan_f32
    fn.restype = ctypes.c_int64
    nan_rows = fn(c_ptr(x), *shape, c_ptr(v), c_ptr(i), ctypes.c_int(torch.get_num_threads()))
    if nan_rows:
        raise _nan_error(nan_rows, rows)
    return v, i


def pair_topk(v0: Tensor, v1: Tensor, pa: Tensor, pb: Tensor, k: int) -> Tensor:
    """Positions ``c`` (into ``pa``/``pb``) of the k largest ``v0[.., pa[c]] + v1[.., pb[c]]``;
    see :func:`select_pairs` (the same selection, returning grid positions and expert ids)."""
    return _pair_topk(v0, v1, pa, pb, k, None)[0]


def select_pairs(
    v0: Tensor, v1: Tensor, i0: Tensor, i1: Tensor, pa: Tensor, pb: Tensor, k: int, S: int
) -> tuple[Tensor, Tensor, Tensor]:
    """The k best listed pairs as grid positions ``a``, ``b`` and expert ids
    ``i0[.., a]·S + i1[.., b]`` (``i0``/``i1``: the halves' sub-key ids, ``[..., K]``), each
    ``[..., k]``; the C kernel writes all three in its selection pass (no index/gather passes)."""
    c, ids = _pair_topk(v0, v1, pa, pb, k, (i0, i1, S))
    if ids is not None:
        return ids
    a, b = (p.index_select(0, c.reshape(-1)).view(c.shape) for p in (pa, pb))
    return a, b, i0.gather(-1, a) * S + i1.gather(-1, b)


def _pair_topk(
    v0: Tensor,
    v1: Tensor,
    pa: Tensor,
    pb: Tensor,
    k: int,
    halves: tuple[Tensor, Tensor, int] | None,
) -> tuple[Tensor, tuple[Tensor, Tensor, Tensor] | None]:
    """Positions ``c`` (into ``pa``/``pb``) of the k largest ``v0[.., pa[c]] + v1[.., pb[c]]``,
    descending, the first listed pair winning a tie. ``v0``/``v1`` ``[..., K]`` carry no gradient.

    The pairs must be a down-closed set of grid positions listed in grid order (row ``a`` holds
    ``b = 0, 1, ...``; no row longer than the one above), as the staircase pairs and the full
    k×k grid are, and ``v0``/``v1`` sorted descending. A fused C kernel (sums computed on the fly,
    rows cut short once nothing more can enter), else a stable descending sort of the candidate
    sums (torch.topk would not do: its tie order is unspecified). NaN sums raise
    :class:`NaNScoresError` on both paths.
    """
    v0, v1 = v0.contiguous(), v1.contiguous()
    K, C = v0.shape[-1], pa.numel()
    rows = v0.numel() // K if K else 0
    lib = float_kernel("topk", _TOPK_C, v0, v1) if pa.device.type == "cpu" else None
    if lib is None:
        cand = v0.index_select(-1, pa) + v1.index_select(-1, pb)
        if cand.numel() and bool(cand.isnan().any()):
            raise _nan_error(int(cand.isnan().any(-1).sum()), rows)
        return cand.sort(dim=-1, descending=True, stable=True).indices[..., :k], None
    buf = torch.empty(*v0.shape[:-1], k, dtype=v0.dtype)
    pos = torch.empty(*v0.shape[:-1], k, dtype=torch.int64)
    ids = id_args = None
    if halves is not None:
        i0, i1, S = halves
        i0, i1 = i0.contiguous(), i1.contiguous()
        ids = tuple(torch.empty_like(pos) for _ in range(3))
        id_args = (c_ptr(i0), c_ptr(i1), ctypes.c_int64(S), *(c_ptr(t) for t in ids))
    fn = getattr(lib, f"pair_topk_{FLOAT_SUFFIX[v0.dtype]}")
    fn.restype = ctypes.c_int64
    nan_rows = fn(
        c_ptr(v0),
        c_ptr(v1),
        c_ptr(pa),
        c_ptr(pb),
        ctypes.c_int64(rows),
        ctypes.c_int64(K),
        ctypes.c_int64(C),
        ctypes.c_int64(k),
        c_ptr(buf),
        c_ptr(pos),
        *(id_args or (None, None, ctypes.c_int64(0), None, None, None)),
        ctypes.c_int(torch.get_num_threads()),
    )
    if nan_rows:
        raise _nan_error(nan_rows, rows)
    return pos, ids


# The half top-k's backward (eager equivalent: subkey_grads' fallback). gk: each (head, half) pair
# b owns its [S, d] slice, zeroed here and accumulated in (t, k) order (the order of the eager
# segment sums over the stably sorted selections). gq: one [d] row per (b, t).
_SUBKEY_GRADS_C = r"""
#include <stdint.h>
#define DEFINE(SUF, T)                                                                          \
void subkey_grads_##SUF(const T* q, const T* keys, const int64_t* idx, const T* g, T* gq,     \
                        T* gk, int64_t B, int64_t n_tok, int64_t K, int64_t S, int64_t d,       \
                        int nth) {                                                              \
  if (gk) {                                                                                     \
    _Pragma("omp parallel for num_threads(nth) schedule(static)")                              \
    for (int64_t b = 0; b < B; ++b) {                                                           \
      T* o = gk + b * S * d;                                                                    \
      for (int64_t x = 0; x < S * d; ++x) o[x] = 0;                                             \
      for (int64_t t = 0; t < n_tok; ++t) {                                                     \
        const int64_t r = b * n_tok + t;                                                        \
        const T* qr = q + r * d;                                                                \
        for (int64_t k = 0; k < K; ++k) {                                                       \
          const T w = g[r * K + k];                                                             \
          T* orow = o + idx[r * K + k] * d;                                                     \
          _Pragma("omp simd")                                                                   \
          for (int64_t j = 0; j < d; ++j) orow[j] += w * qr[j];                                 \
        }                                                                                       \
      }                                                                                         \
    }                                                                                           \
  }                                                                                             \
  if (gq) {                                                                                     \
    _Pragma("omp parallel for num_threads(nth) schedule(static)")                              \
    for (int64_t r = 0; r < B * n_tok; ++r) {                                                   \
      const T* kb = keys + (r / n_tok) * S * d;                                                 \
      T* o = gq + r * d;                                                                        \
      for (int64_t j = 0; j < d; ++j) o[j] = 0;                                                 \
      for (int64_t k = 0; k < K; ++k) {                                                         \
        const T w = g[r * K + k];                                                               \
        const T* krow = kb + idx[r * K + k] * d;                                                \
        _Pragma("omp simd")                                                                     \
        for (int64_t j = 0; j < d; ++j) o[j] += w * krow[j];                                    \
      }                                                                                         \
    }                                                                                           \
  }                                                                                             \
}
DEFINE(f32, float)
DEFINE(f64, double)
"""


def subkey_grads(
    q_BTd: Tensor, keys_BSd: Tensor, top_i: Tensor, g_BTk: Tensor, want_q: bool, want_keys: bool
) -> tuple[Tensor | None, Tensor | None]:
    """Backward of the half top-k ``v[b,t,k] = q[b,t] · keys[b, i[b,t,k]]``:
    ``dq[b,t] = Σ_k g[b,t,k] · keys[b, i[b,t,k]]`` and
    ``dkeys[b,s] = Σ_{(t,k): i[b,t,k] = s} g[b,t,k] · q[b,t]``, in ``keys``' dtype.

    When at least half of each row's S scores are selected (peer-tiny: 36 of 64), a dense score
    gradient and two ``bmm``; else one fused C pass (no sort of the selections, no scratch), or
    per pair ``b`` an ``F.embedding_bag`` for ``dq`` and segment sums for ``dkeys``.
    """
    q_BTd = q_BTd.to(keys_BSd.dtype).contiguous()
    g_BTk = g_BTk.to(keys_BSd.dtype).contiguous()
    keys_BSd, top_i = keys_BSd.contiguous(), top_i.contiguous()
    B, T, K = top_i.shape
    S, d = keys_BSd.shape[1], keys_BSd.shape[2]
    if 2 * K >= S:  # most scores selected: a dense score gradient and two bmm (measured 2x)
        g_BTS = g_BTk.new_zeros(B, T, S).scatter_add_(-1, top_i, g_BTk)
        g_q = torch.bmm(g_BTS, keys_BSd) if want_q else None
        return g_q, torch.bmm(g_BTS.transpose(1, 2), q_BTd) if want_keys else None
    lib = float_kernel("subkey_grads", _SUBKEY_GRADS_C, q_BTd, keys_BSd, g_BTk)
    if lib is not None:
        g_q = torch.empty_like(q_BTd) if want_q else None
        g_keys = torch.empty_like(keys_BSd) if want_keys else None
        getattr(lib, f"subkey_grads_{FLOAT_SUFFIX[keys_BSd.dtype]}")(
            c_ptr(q_BTd),
            c_ptr(keys_BSd),
            c_ptr(top_i),
            c_ptr(g_BTk),
            None if g_q is None else c_ptr(g_q),
            None if g_keys is None else c_ptr(g_keys),
            ctypes.c_int64(B),
            ctypes.c_int64(T),
            ctypes.c_int64(K),
            ctypes.c_int64(S),
            ctypes.c_int64(d),
            ctypes.c_int(torch.get_num_threads()),
        )
        return g_q, g_keys
    g_q = g_keys = None
    if want_q:
        g_q = torch.stack(
            [
                F.embedding_bag(top_i[b], keys_BSd[b], mode="sum", per_sample_weights=g_BTk[b])
                for b in range(B)
            ]
        )
    if want_keys:
        g_keys = torch.zeros_like(keys_BSd)
        for b in range(B):
            groups = RowGroups.build(top_i[b], S)
            g_keys[b].index_copy_(0, groups.rows_U, groups.row_sums(g_BTk[b], q_BTd[b]))
    return g_q, g_keys
