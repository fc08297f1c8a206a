"""AVX2 selection kernels for the half top-k of product-key retrieval
(:func:`moelab.layers.product_key_kernels.topk_last_dim` picks them by row length).

* ``topk_net_f32`` - rows of S <= :data:`NET_MAX_S`: a bitonic sorting network over 8 rows at a
  time, one row per AVX2 lane, moved in and out by 8x8 register transposes, with each merge's last
  three strides run on 8 positions in registers (1.2x faster at S = 64, k = 36, peer-tiny's half
  top-k; 1.7x at S = 32, k = 16: ``scripts/ab_peer_kernels.py`` style old/new in one process);
* ``topk_scan_f32`` - longer rows: the insertion buffer with its rejection test run on 8 entries
  per vector compare, after a branch-free pass that finds a floor no larger than the k-th value
  (the least of k group maxima), so that only the ~3k entries above it reach the buffer (1.7x
  faster at S = 1024, k = 16: 72 -> 41 ms for 32k rows, 1 thread).

Both return exactly the order of the scalar insertion buffer (score descending, lower index first
on ties) and count NaN rows the same way; without AVX2 the build says so and the caller keeps the
scalar buffer.
"""

from __future__ import annotations

import ctypes

from moelab.native import load_c_kernel

# Rows of S <= 128: no branches, so none mispredicted (the scalar insertion buffer mispredicts on
# almost every entry once k is a sizeable share of S, e.g. peer-tiny's k = 36 of S = 64). Entries
# are ordered by (value descending, index ascending), a strict order, so any correct network gives
# exactly the buffer's result, ties included; rows are padded to a power of two with -inf entries
# whose indices (>= S) lose every tie. topk_net_available() says whether the build had AVX2 (a
# scalar network is no faster than the buffer).
TOPK_AVX2_C = r"""
#include <stdint.h>
#include <math.h>
#ifdef __AVX2__
#include <immintrin.h>
#define LANES 8
/* compare-exchange of 8 lanes in registers: with desc, the better entry ends at a, else at b */
static inline __attribute__((always_inline)) void cer(__m256* a, __m256i* x, __m256* b, __m256i* y,
                                                      int desc) {
  /* first: a ranks before b (higher value, or equal value and lower index) */
  const __m256 lower_index = _mm256_castsi256_ps(_mm256_cmpgt_epi32(*y, *x));
  __m256 first = _mm256_or_ps(_mm256_cmp_ps(*a, *b, _CMP_GT_OQ),
                              _mm256_and_ps(_mm256_cmp_ps(*a, *b, _CMP_EQ_OQ), lower_index));
  if (desc) first = _mm256_xor_ps(first, _mm256_castsi256_ps(_mm256_set1_epi32(-1)));
  const __m256 na = _mm256_blendv_ps(*a, *b, first), nb = _mm256_blendv_ps(*b, *a, first);
  const __m256 xf = _mm256_castsi256_ps(*x), yf = _mm256_castsi256_ps(*y);
  *x = _mm256_castps_si256(_mm256_blendv_ps(xf, yf, first));
  *y = _mm256_castps_si256(_mm256_blendv_ps(yf, xf, first));
  *a = na; *b = nb;
}
/* the same on positions held in the block's arrays */
static inline void ce(float* va, int32_t* ia, float* vb, int32_t* ib, int desc) {
  __m256 a = _mm256_load_ps(va), b = _mm256_load_ps(vb);
  __m256i x = _mm256_load_si256((const __m256i*)ia), y = _mm256_load_si256((const __m256i*)ib);
  cer(&a, &x, &b, &y, desc);
  _mm256_store_ps(va, a); _mm256_store_ps(vb, b);
  _mm256_store_si256((__m256i*)ia, x); _mm256_store_si256((__m256i*)ib, y);
}
int topk_net_available(void) { return 1; }

/* The insertion buffer of topk_rows_f32 for long rows, with its rejection test run 8 entries at a
   time once the buffer is full: one vector compare against the k-th value, and only the lanes that
   pass (NaN passes too: _CMP_NLE_UQ) go through the scalar insertion, which tests them again
   against the threshold as it rises, in index order (so ties still go to the lower index). */
static inline void insert(const float* x, int64_t j, int64_t k, float* v, int64_t* ix, int64_t* n,
                          int* nan) {
  const float xj = x[j];
  if (*n == k && xj <= v[k - 1]) return;
  if (xj != xj) { *nan = 1; return; }
  int64_t p = *n < k ? (*n)++ : k - 1;
  while (p > 0 && v[p - 1] < xj) { v[p] = v[p - 1]; ix[p] = ix[p - 1]; --p; }
  v[p] = xj; ix[p] = j;
}
/* A value no larger than the row's k-th largest, from one branch-free pass: the smallest of the
   maxima of k disjoint groups (k entries are >= it). Entries below it cannot be among the top k,
   so the scan skips them before its buffer holds k entries (without this, the first entries of a
   row all enter the buffer, one mispredicted branch and insertion each). -inf when the groups
   would be shorter than one vector (every entry is then scanned, as before). */
static inline float group_floor(const float* x, int64_t S, int64_t k) {
  const int64_t G = (S / k) & ~(int64_t)7;
  if (G < 8) return -INFINITY;
  float floor_v = INFINITY;
  for (int64_t g = 0; g < k; ++g) {
    const float* xg = x + g * G;
    __m256 mx = _mm256_loadu_ps(xg);
    for (int64_t j = 8; j < G; j += 8) mx = _mm256_max_ps(mx, _mm256_loadu_ps(xg + j));
    __m128 h = _mm_max_ps(_mm256_castps256_ps128(mx), _mm256_extractf128_ps(mx, 1));
    h = _mm_max_ps(h, _mm_movehl_ps(h, h));
    h = _mm_max_ss(h, _mm_shuffle_ps(h, h, 1));
    const float gmax = _mm_cvtss_f32(h);
    floor_v = gmax < floor_v ? gmax : floor_v;  /* a NaN max (not the floor) is never taken */
  }
  return floor_v;
}
int64_t topk_scan_f32(const float* s, int64_t rows, int64_t S, int64_t k, float* out_v,
                      int64_t* out_i, int nth) {
  int64_t nan_rows = 0;
  _Pragma("omp parallel for num_threads(nth) schedule(static) reduction(+:nan_rows)")
  for (int64_t r = 0; r < rows; ++r) {
    const float* x = s + r * S;
    float* v = out_v + r * k;
    int64_t* ix = out_i + r * k;
    int64_t n = 0, j = 0;
    int nan = 0;
    const float floor_v = group_floor(x, S, k);
    const __m256 floor8 = _mm256_set1_ps(floor_v);
    for (; j + 8 <= S; j += 8) {
      const __m256 xj = _mm256_loadu_ps(x + j);
      int m = n < k ? _mm256_movemask_ps(_mm256_cmp_ps(xj, floor8, _CMP_NLT_UQ))
                    : _mm256_movemask_ps(_mm256_cmp_ps(xj, _mm256_set1_ps(v[k - 1]), _CMP_NLE_UQ));
      while (m) {
        insert(x, j + __builtin_ctz(m), k, v, ix, &n, &nan);
        m &= m - 1;
      }
    }
    for (; j < S; ++j)
      if (!(x[j] < floor_v)) insert(x, j, k, v, ix, &n, &nan);
    nan_rows += nan;
  }
  return nan_rows;
}
/* in-register 8x8 transpose: r[q] holds row q on entry, column q on return */
static inline void tr8(__m256* r) {
  __m256 t0 = _mm256_unpacklo_ps(r[0], r[1]), t1 = _mm256_unpackhi_ps(r[0], r[1]);
  __m256 t2 = _mm256_unpacklo_ps(r[2], r[3]), t3 = _mm256_unpackhi_ps(r[2], r[3]);
  __m256 t4 = _mm256_unpacklo_ps(r[4], r[5]), t5 = _mm256_unpackhi_ps(r[4], r[5]);
  __m256 t6 = _mm256_unpacklo_ps(r[6], r[7]), t7 = _mm256_unpackhi_ps(r[6], r[7]);
  __m256 s0 = _mm256_shuffle_ps(t0, t2, 0x44), s1 = _mm256_shuffle_ps(t0, t2, 0xEE);
  __m256 s2 = _mm256_shuffle_ps(t1, t3, 0x44), s3 = _mm256_shuffle_ps(t1, t3, 0xEE);
  __m256 s4 = _mm256_shuffle_ps(t4, t6, 0x44), s5 = _mm256_shuffle_ps(t4, t6, 0xEE);
  __m256 s6 = _mm256_shuffle_ps(t5, t7, 0x44), s7 = _mm256_shuffle_ps(t5, t7, 0xEE);
  r[0] = _mm256_permute2f128_ps(s0, s4, 0x20); r[1] = _mm256_permute2f128_ps(s1, s5, 0x20);
  r[2] = _mm256_permute2f128_ps(s2, s6, 0x20); r[3] = _mm256_permute2f128_ps(s3, s7, 0x20);
  r[4] = _mm256_permute2f128_ps(s0, s4, 0x31); r[5] = _mm256_permute2f128_ps(s1, s5, 0x31);
  r[6] = _mm256_permute2f128_ps(s2, s6, 0x31); r[7] = _mm256_permute2f128_ps(s3, s7, 0x31);
}

/* strides 4, 2 and 1 of a merge on positions p..p+7 (8 values and 8 index vectors) */
static inline __attribute__((always_inline)) void last3(float (*v)[LANES], int32_t (*ix)[LANES],
                                                        int64_t p, int desc) {
  __m256 a[8]; __m256i i[8];
  for (int q = 0; q < 8; ++q) {
    a[q] = _mm256_load_ps(v[p + q]);
    i[q] = _mm256_load_si256((const __m256i*)ix[p + q]);
  }
  for (int q = 0; q < 4; ++q) cer(&a[q], &i[q], &a[q+4], &i[q+4], desc);
  cer(&a[0], &i[0], &a[2], &i[2], desc); cer(&a[1], &i[1], &a[3], &i[3], desc);
  cer(&a[4], &i[4], &a[6], &i[6], desc); cer(&a[5], &i[5], &a[7], &i[7], desc);
  for (int q = 0; q < 8; q += 2) cer(&a[q], &i[q], &a[q+1], &i[q+1], desc);
  for (int q = 0; q < 8; ++q) {
    _mm256_store_ps(v[p + q], a[q]);
    _mm256_store_si256((__m256i*)ix[p + q], i[q]);
  }
}
/* Bitonic sort of the block's P positions, descending. A merge's strides 4, 2 and 1 run on 8
   positions held in registers (last3), not in memory: 1.2x faster at S = 64 (peer-tiny's half). */
static inline __attribute__((always_inline)) void net(float (*v)[LANES], int32_t (*ix)[LANES],
                                                      const int64_t P) {
  for (int64_t size = 2; size <= P; size *= 2) {
    for (int64_t stride = size / 2; stride > 0 && !(size >= 8 && stride < 8); stride /= 2)
      for (int64_t base = 0; base < P; base += 2 * stride) {
        const int desc = (base & size) == 0;  /* one direction per block: no branch per pair */
        for (int64_t p = base; p < base + stride; ++p)
          if (desc) ce(v[p], ix[p], v[p + stride], ix[p + stride], 1);
          else ce(v[p], ix[p], v[p + stride], ix[p + stride], 0);
      }
    if (size >= 8)
      for (int64_t p = 0; p < P; p += 8) {
        if ((p & size) == 0) last3(v, ix, p, 1);
        else last3(v, ix, p, 0);
      }
  }
}
int64_t topk_net_f32(const float* s, int64_t rows, int64_t S, int64_t P, int64_t k, float* out_v,
                     int64_t* out_i, int nth) {
  int64_t nan_rows = 0;
  const int64_t blocks = (rows + LANES - 1) / LANES;
  _Pragma("omp parallel for num_threads(nth) schedule(static) reduction(+:nan_rows)")
  for (int64_t blk = 0; blk < blocks; ++blk) {
    float v[128][LANES] __attribute__((aligned(32)));
    int32_t ix[128][LANES] __attribute__((aligned(32)));
    const int64_t r0 = blk * LANES;
    if (r0 + LANES <= rows && S % 8 == 0) {  /* 8 whole rows: in by 8x8 transposes */
      __m256 nanm = _mm256_setzero_ps();
      for (int64_t p0 = 0; p0 < S; p0 += 8) {
        __m256 r[8];
        for (int l = 0; l < 8; ++l) r[l] = _mm256_loadu_ps(s + (r0 + l) * S + p0);
        tr8(r);
        for (int q = 0; q < 8; ++q) {
          nanm = _mm256_or_ps(nanm, _mm256_cmp_ps(r[q], r[q], _CMP_UNORD_Q));
          _mm256_store_ps(v[p0 + q], r[q]);
        }
      }
      for (int64_t p = S; p < P; ++p) _mm256_store_ps(v[p], _mm256_set1_ps(-INFINITY));
      for (int64_t p = 0; p < P; ++p)
        _mm256_store_si256((__m256i*)ix[p], _mm256_set1_epi32((int)p));
      nan_rows += __builtin_popcount(_mm256_movemask_ps(nanm));  /* lane l: row l had a NaN */
    } else {  /* the last rows, or S not a multiple of 8: one entry at a time, -inf padding */
      for (int l = 0; l < LANES; ++l) {
        const int64_t r = r0 + l;
        int nan = 0;
        for (int64_t p = 0; p < P; ++p) {
          const float x = (r < rows && p < S) ? s[r * S + p] : -INFINITY;
          nan |= x != x;
          v[p][l] = x;
          ix[p][l] = (int32_t)p;
        }
        nan_rows += nan;
      }
    }
    switch (P) {  /* constant P: the compiler unrolls the short loops */
      case 64: net(v, ix, 64); break;
      case 32: net(v, ix, 32); break;
      case 128: net(v, ix, 128); break;
      default: net(v, ix, P);
    }
    if (r0 + LANES <= rows) {  /* out by transposes, 8 positions at a time; the rest one by one */
      int64_t j = 0;
      for (; j + 8 <= k; j += 8) {
        __m256 r[8];
        for (int q = 0; q < 8; ++q) r[q] = _mm256_load_ps(v[j + q]);
        tr8(r);
        for (int l = 0; l < 8; ++l) _mm256_storeu_ps(out_v + (r0 + l) * k + j, r[l]);
        for (int q = 0; q < 8; ++q)
          r[q] = _mm256_castsi256_ps(_mm256_load_si256((const __m256i*)ix[j + q]));
        tr8(r);
        for (int l = 0; l < 8; ++l) {
          const __m256i w = _mm256_castps_si256(r[l]);
          int64_t* o = out_i + (r0 + l) * k + j;
          _mm256_storeu_si256((__m256i*)o, _mm256_cvtepi32_epi64(_mm256_castsi256_si128(w)));
          const __m128i hi = _mm256_extracti128_si256(w, 1);
          _mm256_storeu_si256((__m256i*)(o + 4), _mm256_cvtepi32_epi64(hi));
        }
      }
      for (int l = 0; l < LANES; ++l)
        for (int64_t jj = j; jj < k; ++jj) {
          out_v[(r0 + l) * k + jj] = v[jj][l];
          out_i[(r0 + l) * k + jj] = ix[jj][l];
        }
    } else {
      for (int l = 0; l < LANES && r0 + l < rows; ++l)
        for (int64_t j = 0; j < k; ++j) {
          out_v[(r0 + l) * k + j] = v[j][l];
          out_i[(r0 + l) * k + j] = ix[j][l];
        }
    }
  }
  return nan_rows;
}
#else
int topk_net_available(void) { return 0; }
#endif
"""
NET_MAX_S = 128  # measured: beyond this the network's S·log²S work loses to the buffer


def avx2_topk_lib() -> ctypes.CDLL | None:
    """The AVX2 selection kernels when the build had AVX2, else None (use the scalar buffer)."""
    lib = load_c_kernel("topk_net", TOPK_AVX2_C)
    return lib if lib is not None and lib.topk_net_available() else None
