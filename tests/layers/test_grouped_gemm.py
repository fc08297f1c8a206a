"""Grouped matmuls over expert-sorted rows: MKL's batch GEMM and the torch.mm loop against a
per-expert reference, including experts with no rows."""

from __future__ import annotations

import pytest
import torch

from moelab import native
from moelab.layers import grouped_gemm
from moelab.layers.grouped_gemm import rows_matmul, rows_outer

COUNTS = [5, 0, 3, 7, 0, 1]  # experts 1 and 4 have no rows


def _operands(dtype: torch.dtype):
    g = torch.Generator().manual_seed(0)
    n, K, M = sum(COUNTS), 6, 4
    x = torch.randn(n, K, generator=g, dtype=dtype)
    w = torch.randn(len(COUNTS), K, M, generator=g, dtype=dtype)
    gy = torch.randn(n, M, generator=g, dtype=dtype)
    return x, w, gy


def _reference(x, w, gy):
    """Row by row: each row times its own expert's matrix; weight gradients as sums of outer
    products (a different summation than a matmul)."""
    experts = [e for e, c in enumerate(COUNTS) for _ in range(c)]
    y = torch.stack([x[i] @ w[e] for i, e in enumerate(experts)])
    back = torch.stack([gy[i] @ w[e].T for i, e in enumerate(experts)])
    outer = torch.zeros_like(w)
    for i, e in enumerate(experts):
        outer[e] += torch.outer(x[i], gy[i])
    return y, back, outer


@pytest.fixture(params=["mkl", "loop"])
def path(request, monkeypatch):
    if request.param == "mkl":
        if native.mkl_gemm_batch(torch.float32) is None:
            pytest.skip("this torch build carries no MKL batch GEMM")
    else:
        monkeypatch.setattr(grouped_gemm, "mkl_gemm_batch", lambda dtype: None)
    return request.param


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_grouped_matmuls_match_the_per_row_reference(path, dtype):
    x, w, gy = _operands(dtype)
    y_ref, back_ref, outer_ref = _reference(x, w, gy)
    y = rows_matmul(x, w, COUNTS, torch.full((x.shape[0], w.shape[2]), float("nan"), dtype=dtype))
    back = rows_matmul(gy, w, COUNTS, torch.empty(x.shape, dtype=dtype), transpose_w=True)
    outer = rows_outer(x, gy, COUNTS, torch.full_like(w, float("nan")))  # stale memory: zeroed
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(y, y_ref, **tol)
    torch.testing.assert_close(back, back_ref, **tol)
    torch.testing.assert_close(outer, outer_ref, **tol)
    assert outer[1].abs().max() == 0 and outer[4].abs().max() == 0


def test_batch_call_is_used_for_small_matmuls_and_the_loop_for_large(monkeypatch):
    if native.mkl_gemm_batch(torch.float32) is None:
        pytest.skip("this torch build carries no MKL batch GEMM")
    calls = []
    real = grouped_gemm._batch_call
    monkeypatch.setattr(
        grouped_gemm, "_batch_call", lambda *a, **k: calls.append(1) or real(*a, **k)
    )
    x, w, _ = _operands(torch.float32)
    rows_matmul(x, w, COUNTS, torch.empty(x.shape[0], w.shape[2]))
    assert calls == [1]
    monkeypatch.setattr(grouped_gemm, "BATCH_MAX_MACS", 1)  # every matmul counts as large
    y = rows_matmul(x, w, COUNTS, torch.empty(x.shape[0], w.shape[2]))
    assert calls == [1]
    torch.testing.assert_close(y, _reference(x, w, torch.zeros(x.shape[0], 4))[0])


def test_other_dtypes_and_non_contiguous_operands_take_the_loop():
    x, w, gy = _operands(torch.float32)
    w_t = w.transpose(1, 2).contiguous().transpose(1, 2)  # same values, not contiguous
    y = rows_matmul(x, w_t, COUNTS, torch.empty(x.shape[0], w.shape[2]))
    torch.testing.assert_close(y, _reference(x, w, gy)[0])
    xb, wb = x.to(torch.bfloat16), w.to(torch.bfloat16)
    yb = rows_matmul(xb, wb, COUNTS, torch.empty(x.shape[0], w.shape[2], dtype=torch.bfloat16))
    y_ref = _reference(xb.float(), wb.float(), gy)[0]
    torch.testing.assert_close(yb.float(), y_ref, rtol=2e-2, atol=2e-2)


def test_the_environment_switch_turns_the_batch_gemm_off(monkeypatch):
    from moelab.layers.experts import GroupedExperts

    monkeypatch.setattr(native, "_GEMM_BATCH", {})
    monkeypatch.setenv("MOELAB_NO_MKL_BATCH", "1")
    assert native.mkl_gemm_batch(torch.float32) is None
    assert GroupedExperts(4, 16, 8).resolved_backend(torch.zeros(1, 16)) == "bmm"  # pre-MKL rule
    x, w, gy = _operands(torch.float32)  # and the grouped matmuls still run (torch.mm loop)
    y = rows_matmul(x, w, COUNTS, torch.empty(x.shape[0], w.shape[2]))
    torch.testing.assert_close(y, _reference(x, w, gy)[0])
