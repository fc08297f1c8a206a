"""The fused SwiGLU kernels against autograd on the eager formula, with and without a row gate."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from moelab import native
from moelab.layers.dense import DenseFFN, ffn
from moelab.layers.swiglu import swiglu, swiglu_backward, swiglu_forward


@pytest.fixture(params=["c", "eager"])
def kernel(request, monkeypatch):
    monkeypatch.setattr(native, "_KERNELS", {})
    if request.param == "eager":
        monkeypatch.setenv("MOELAB_NO_C_KERNELS", "1")
    elif native.load_c_kernel("probe", "int probe(void) { return 1; }") is None:
        pytest.skip("no C compiler")
    return request.param


def _reference(h, gate, grad_ga):
    h = h.detach().requires_grad_(True)
    gate = gate.detach().requires_grad_(True)
    g, u = h.chunk(2, dim=-1)
    a = F.silu(g) * u
    ga = a * gate[:, None]
    grad_h, grad_gate = torch.autograd.grad(ga, (h, gate), grad_ga)
    return a.detach(), ga.detach(), grad_h, grad_gate


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_forward_and_backward_match_autograd(kernel, dtype):
    g = torch.Generator().manual_seed(0)
    h = torch.randn(37, 2 * 19, generator=g, dtype=dtype) * 4  # odd sizes: vector loop tails
    h[0, :5] = torch.tensor([-100.0, 100.0, 0.0, -30.0, 30.0], dtype=dtype)  # exp range ends
    gate = torch.rand(37, generator=g, dtype=dtype)
    grad_ga = torch.randn(37, 19, generator=g, dtype=dtype)
    a_ref, ga_ref, grad_h_ref, grad_gate_ref = _reference(h, gate, grad_ga)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-12)
    a, ga = swiglu_forward(h, gate)
    torch.testing.assert_close(a, a_ref, **tol)
    torch.testing.assert_close(ga, ga_ref, **tol)
    grad_h, grad_gate = swiglu_backward(h, grad_ga, a, gate)
    torch.testing.assert_close(grad_h, grad_h_ref, **tol)
    torch.testing.assert_close(grad_gate, grad_gate_ref, **tol)
    # without a gate: the plain activation and its gradient
    a_only, same = swiglu_forward(h)
    assert same is a_only
    torch.testing.assert_close(a_only, a_ref, **tol)
    grad_plain, none = swiglu_backward(h, grad_ga)
    assert none is None
    ungated = _reference(h, torch.ones(37, dtype=dtype), grad_ga)[2]
    torch.testing.assert_close(grad_plain, ungated, **tol)


def test_nan_in_the_gate_half_propagates(kernel):
    h = torch.ones(2, 8)
    h[1, 0] = float("nan")
    a, _ = swiglu_forward(h)
    assert a[1, 0].isnan() and not a[0].isnan().any()
    grad_h, _ = swiglu_backward(h, torch.ones(2, 4))
    assert grad_h[1, 0].isnan() and grad_h[1, 4].isnan()


def test_dense_ffn_gradients_match_finite_differences(kernel):
    torch.manual_seed(0)
    ffn_ = DenseFFN(6, 5).double()
    x = torch.randn(2, 3, 6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, a, b: ffn_.forward(x), (x, ffn_.w13_DF2, ffn_.w2_FD))
    torch.testing.assert_close(ffn_(x), ffn(x, ffn_.w13_DF2, ffn_.w2_FD, "swiglu"))


def test_swiglu_on_views_and_other_dtypes_uses_the_eager_formula():
    h = torch.randn(4, 10, dtype=torch.bfloat16)
    g, u = h.chunk(2, dim=-1)
    torch.testing.assert_close(swiglu(h), F.silu(g) * u)
    wide = torch.randn(4, 20)[:, ::2]  # not contiguous
    g, u = wide.chunk(2, dim=-1)
    torch.testing.assert_close(swiglu(wide), F.silu(g) * u)
