"""Grouped matmuls over expert-sorted rows: the expert FFN's six matmuls, each one call.

Rows ``x_NK`` are sorted by expert, ``counts[e]`` rows for expert ``e``; expert weights are stacked
``w_EKM``. The two shapes an expert FFN needs (forward, and the input and weight gradients of its
backward) are:

* :func:`rows_matmul`: ``out[rows_e] = x[rows_e] @ w[e]`` (or ``@ w[e].T``);
* :func:`rows_outer`: ``out[e] = x[rows_e].T @ g[rows_e]`` (a weight gradient).

On CPU with float32/float64 each is one call of MKL's grouped GEMM (:func:`moelab.native.
mkl_gemm_batch`); the fallback (other devices, dtypes or BLAS) is a loop of ``torch.mm(..., out=)``
over the experts. Both write into ``out`` and give the same numbers up to summation order.
"""

from __future__ import annotations

import ctypes

import torch
from torch import Tensor

from moelab.native import mkl_gemm_batch

_ROW_MAJOR, _NO_TRANS, _TRANS = 101, 111, 112

# Average multiply-adds per expert matmul from which one ``torch.mm`` per expert is used instead of
# the batch call: at coarse-expert sizes (512 rows x 512 x 2048-4096, >= 2^29 MACs) each matmul
# already fills both cores and the loop measured 3% faster; at fine-grained sizes (<= 2^27) the
# batch call was 2-10% faster, the more so the narrower the experts.
BATCH_MAX_MACS = 2**28


def _expert_ranges(counts: list[int]) -> list[tuple[int, int, int]]:
    """``(expert, first row, rows)`` of every expert with rows."""
    out, start = [], 0
    for e, n in enumerate(counts):
        if n:
            out.append((e, start, n))
            start += n
    return out


def _macs(a_NK: Tensor, b_NM: Tensor, ranges: list) -> float:
    """Average multiply-adds of one expert's matmul (rows x K x M)."""
    return a_NK.shape[0] * a_NK.shape[1] * b_NM.shape[1] / max(len(ranges), 1)


def _mkl(macs_per_group: float, *tensors: Tensor):
    """MKL's batch GEMM when every operand qualifies (CPU, one float32/64 dtype, contiguous) and
    the matmuls are small enough for it to pay (see :data:`BATCH_MAX_MACS`), else None."""
    t0 = tensors[0]
    if (
        macs_per_group >= BATCH_MAX_MACS
        or t0.device.type != "cpu"
        or any(
            t.dtype != t0.dtype or t.device != t0.device or not t.is_contiguous() for t in tensors
        )
    ):
        return None
    return mkl_gemm_batch(t0.dtype)


def _batch_call(
    fn, dtype: torch.dtype, trans_a: int, trans_b: int, mnk, ptrs, lds, beta: float = 0.0
) -> None:
    """One ``cblas_?gemm_batch`` call with one group per matmul (each group has its own sizes)."""
    g = len(ptrs[0])
    if g == 0:
        return
    i32 = ctypes.c_int * g
    real = (ctypes.c_float if dtype == torch.float32 else ctypes.c_double) * g
    pp = ctypes.c_void_p * g
    m, n, k = (i32(*v) for v in mnk)
    a, b, c = (pp(*p) for p in ptrs)
    lda, ldb, ldc = (i32(*v) for v in lds)
    fn(
        ctypes.c_int(_ROW_MAJOR),
        i32(*([trans_a] * g)),
        i32(*([trans_b] * g)),
        m,
        n,
        k,
        real(*([1.0] * g)),
        a,
        lda,
        b,
        ldb,
        real(*([beta] * g)),
        c,
        ldc,
        ctypes.c_int(g),
        i32(*([1] * g)),
    )


def rows_matmul(
    x_NK: Tensor, w_EKM: Tensor, counts: list[int], out_NM: Tensor, transpose_w: bool = False
) -> Tensor:
    """``out[rows_e] = x[rows_e] @ w[e]`` (``w[e].T`` with ``transpose_w``) for every expert.

    ``w_EKM`` is ``[E, K, M]``, or ``[E, M, K]`` with ``transpose_w``. Rows of experts with no
    rows are not touched (there are none). All tensors contiguous.
    """
    ranges = _expert_ranges(counts)
    fn = _mkl(_macs(x_NK, out_NM, ranges), x_NK, w_EKM, out_NM)
    if fn is None:
        for e, s, n in ranges:
            w = w_EKM[e].T if transpose_w else w_EKM[e]
            torch.mm(x_NK[s : s + n], w, out=out_NM[s : s + n])
        return out_NM
    K, M = x_NK.shape[1], out_NM.shape[1]
    size = x_NK.element_size()
    xp, wp, op = x_NK.data_ptr(), w_EKM.data_ptr(), out_NM.data_ptr()
    w_stride = w_EKM.stride(0) * size
    _batch_call(
        fn,
        x_NK.dtype,
        _NO_TRANS,
        _TRANS if transpose_w else _NO_TRANS,
        ([n for _, _, n in ranges], [M] * len(ranges), [K] * len(ranges)),
        (
            [xp + s * K * size for _, s, _ in ranges],
            [wp + e * w_stride for e, _, _ in ranges],
            [op + s * M * size for _, s, _ in ranges],
        ),
        ([K] * len(ranges), [K if transpose_w else M] * len(ranges), [M] * len(ranges)),
    )
    return out_NM


def rows_outer(x_NK: Tensor, g_NM: Tensor, counts: list[int], out_EKM: Tensor) -> Tensor:
    """``out[e] = x[rows_e].T @ g[rows_e]`` for every expert; experts without rows get zeros."""
    ranges = _expert_ranges(counts)
    if len(ranges) < len(counts):
        out_EKM.zero_()
    fn = _mkl(_macs(x_NK, g_NM, ranges), x_NK, g_NM, out_EKM)
    if fn is None:
        for e, s, n in ranges:
            torch.mm(x_NK[s : s + n].T, g_NM[s : s + n], out=out_EKM[e])
        return out_EKM
    K, M = x_NK.shape[1], g_NM.shape[1]
    size = x_NK.element_size()
    xp, gp, op = x_NK.data_ptr(), g_NM.data_ptr(), out_EKM.data_ptr()
    _batch_call(
        fn,
        x_NK.dtype,
        _TRANS,
        _NO_TRANS,
        ([K] * len(ranges), [M] * len(ranges), [n for _, _, n in ranges]),
        (
            [xp + s * K * size for _, s, _ in ranges],
            [gp + s * M * size for _, s, _ in ranges],
            [op + e * K * M * size for e, _, _ in ranges],
        ),
        ([K] * len(ranges), [M] * len(ranges), [M] * len(ranges)),
    )
    return out_EKM
