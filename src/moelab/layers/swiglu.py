"""SwiGLU on fused up-projection rows, forward and backward each in one memory pass.

``h_NF2`` holds the gate half ``g`` then the up half ``u`` of every row; the activation is
``a = silu(g) · u``, optionally scaled by a per-row gate ``gate_N`` (a router weight applied on the
hidden rows of narrow experts). Eager PyTorch needs five to eight passes over ``[N, F]`` tensors
for the backward (sigmoid, silu, its derivative, products); on CPU those passes cost as much as a
fifth of a fine-grained MoE layer's step. The C kernel (:func:`moelab.native.float_kernel`) reads
each input once and writes each output once; the eager functions are the fallback (other devices
and dtypes, no compiler, ``MOELAB_NO_C_KERNELS=1``) and the reference the tests compare against.

float32 uses a polynomial ``exp`` (Cephes' ``expf``, relative error about 1e-7) so the loop
vectorises without ``-ffast-math``; float64 uses libm's ``exp``.
"""

from __future__ import annotations

import ctypes

import torch
import torch.nn.functional as F
from torch import Tensor

from moelab.native import FLOAT_SUFFIX, c_ptr, float_kernel

_SWIGLU_C = r"""
#include <math.h>
#include <stdint.h>
#include <string.h>

static inline float exp_f32(float x) {
  /* Cephes expf: x = n ln2 + r, |r| <= ln2/2, exp(r) by a degree-6 polynomial, 2^n by bits. */
  x = x < -87.0f ? -87.0f : (x > 88.0f ? 88.0f : x);
  float n = __builtin_rintf(x * 1.44269504088896341f);
  float r = x - n * 0.693359375f + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  int32_t bits = ((int32_t)n + 127) << 23;
  float scale;
  memcpy(&scale, &bits, sizeof scale);
  return p * scale;
}
static inline double exp_f64(double x) { return exp(x); }

#define DEFINE(SUF, T)                                                                          \
void swiglu_fwd_##SUF(const T* h, const T* gate, T* a, T* ga, int64_t N, int64_t F, int nth) { \
  _Pragma("omp parallel for num_threads(nth) schedule(static)")                                \
  for (int64_t n = 0; n < N; ++n) {                                                             \
    const T* g = h + n * 2 * F;                                                                 \
    const T* u = g + F;                                                                         \
    T* an = a + n * F;                                                                          \
    _Pragma("omp simd")                                                                         \
    for (int64_t f = 0; f < F; ++f) an[f] = g[f] / ((T)1 + exp_##SUF(-g[f])) * u[f];            \
    if (ga) {                                                                                   \
      const T s = gate[n];                                                                      \
      T* gn = ga + n * F;                                                                       \
      _Pragma("omp simd")                                                                       \
      for (int64_t f = 0; f < F; ++f) gn[f] = an[f] * s;                                        \
    }                                                                                           \
  }                                                                                             \
}                                                                                               \
void swiglu_bwd_##SUF(const T* h, const T* grad_ga, const T* a, const T* gate, T* grad_h,      \
                      T* grad_gate, int64_t N, int64_t F, int nth) {                            \
  _Pragma("omp parallel for num_threads(nth) schedule(static)")                                \
  for (int64_t n = 0; n < N; ++n) {                                                             \
    const T* g = h + n * 2 * F;                                                                 \
    const T* u = g + F;                                                                         \
    const T* gr = grad_ga + n * F;                                                              \
    T* dg = grad_h + n * 2 * F;                                                                 \
    T* du = dg + F;                                                                             \
    T s = 1;                                                                                    \
    if (gate) {                                                                                 \
      const T* an = a + n * F;                                                                  \
      T acc = 0;                                                                                \
      _Pragma("omp simd reduction(+:acc)")                                                      \
      for (int64_t f = 0; f < F; ++f) acc += gr[f] * an[f];                                     \
      if (grad_gate) grad_gate[n] = acc;                                                        \
      s = gate[n];                                                                              \
    }                                                                                           \
    _Pragma("omp simd")                                                                         \
    for (int64_t f = 0; f < F; ++f) {                                                           \
      const T sig = (T)1 / ((T)1 + exp_##SUF(-g[f]));                                           \
      const T silu = g[f] * sig;                                                                \
      const T d = gr[f] * s;                                                                    \
      du[f] = d * silu;                                                                         \
      dg[f] = d * u[f] * (sig + silu * ((T)1 - sig));                                           \
    }                                                                                           \
  }                                                                                             \
}
DEFINE(f32, float)
DEFINE(f64, double)
"""


def _lib(*tensors: Tensor) -> ctypes.CDLL | None:
    return float_kernel("swiglu", _SWIGLU_C, *tensors)


def swiglu_forward(h_NF2: Tensor, gate_N: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """``(a, ga)``: ``a = silu(g)·u`` of every row and ``ga = a·gate_N`` (``a`` itself when no
    gate). ``h_NF2`` is ``[N, 2F]``, gate half first."""
    N, F2 = h_NF2.shape
    lib = _lib(h_NF2) if gate_N is None else _lib(h_NF2, gate_N)
    if lib is None:
        gate, up = h_NF2.chunk(2, dim=-1)
        a_NF = F.silu(gate).mul_(up)
        return a_NF, (a_NF if gate_N is None else a_NF * gate_N[:, None])
    a_NF = h_NF2.new_empty(N, F2 // 2)
    ga_NF = a_NF if gate_N is None else torch.empty_like(a_NF)
    getattr(lib, f"swiglu_fwd_{FLOAT_SUFFIX[h_NF2.dtype]}")(
        c_ptr(h_NF2),
        None if gate_N is None else c_ptr(gate_N),
        c_ptr(a_NF),
        None if gate_N is None else c_ptr(ga_NF),
        ctypes.c_int64(N),
        ctypes.c_int64(F2 // 2),
        ctypes.c_int(torch.get_num_threads()),
    )
    return a_NF, ga_NF


def swiglu_backward(
    h_NF2: Tensor,
    grad_ga_NF: Tensor,
    a_NF: Tensor | None = None,
    gate_N: Tensor | None = None,
    need_gate_grad: bool = True,
) -> tuple[Tensor, Tensor | None]:
    """``(grad_h, grad_gate)`` from the gradient of the (gated) activation ``ga = gate·silu(g)·u``.

    ``a_NF`` (the ungated activation) is needed only for ``grad_gate = Σ_f grad_ga·a``; without a
    gate ``grad_gate`` is None.
    """
    grad_ga_NF = grad_ga_NF.contiguous()
    tensors = [h_NF2, grad_ga_NF] + ([] if gate_N is None else [a_NF, gate_N])
    lib = _lib(*tensors)
    want_gate = gate_N is not None and need_gate_grad
    if lib is None:
        grad_gate_N = (grad_ga_NF * a_NF).sum(1) if want_gate else None
        grad_a_NF = grad_ga_NF if gate_N is None else grad_ga_NF * gate_N[:, None]
        return _swiglu_backward_eager(h_NF2, grad_a_NF), grad_gate_N
    N, F2 = h_NF2.shape
    grad_h_NF2 = torch.empty_like(h_NF2)
    grad_gate_N = torch.empty_like(gate_N) if want_gate else None
    getattr(lib, f"swiglu_bwd_{FLOAT_SUFFIX[h_NF2.dtype]}")(
        c_ptr(h_NF2),
        c_ptr(grad_ga_NF),
        None if gate_N is None else c_ptr(a_NF),
        None if gate_N is None else c_ptr(gate_N),
        c_ptr(grad_h_NF2),
        None if grad_gate_N is None else c_ptr(grad_gate_N),
        ctypes.c_int64(N),
        ctypes.c_int64(F2 // 2),
        ctypes.c_int(torch.get_num_threads()),
    )
    return grad_h_NF2, grad_gate_N


def _swiglu_backward_eager(h_NF2: Tensor, grad_a_NF: Tensor) -> Tensor:
    """``d/dh`` of ``silu(g)·u`` written into one ``[N, 2F]`` buffer (gate half, then up half)."""
    gate, up = h_NF2.chunk(2, dim=-1)
    grad_h = torch.empty_like(h_NF2)
    grad_gate, grad_up = grad_h.chunk(2, dim=-1)
    sig = torch.sigmoid(gate)
    silu = gate * sig
    torch.mul(grad_a_NF, silu, out=grad_up)
    # silu'(g) = σ(g)·(1 + g·(1 − σ(g))) = σ(g) + silu(g)·(1 − σ(g))
    dsilu = silu.mul_(1.0 - sig).add_(sig)
    torch.mul(grad_a_NF * up, dsilu, out=grad_gate)
    return grad_h


class _SwiGLU(torch.autograd.Function):
    """``silu(g)·u`` of ``h = [g | u]`` with the fused kernels; saves only ``h``."""

    @staticmethod
    def forward(ctx, h: Tensor) -> Tensor:  # type: ignore[override]
        h_NF2 = h.reshape(-1, h.shape[-1])
        ctx.save_for_backward(h_NF2)
        ctx.shape = h.shape
        a_NF, _ = swiglu_forward(h_NF2)
        return a_NF.view(*h.shape[:-1], h.shape[-1] // 2)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_a: Tensor) -> Tensor:  # type: ignore[override]
        (h_NF2,) = ctx.saved_tensors
        grad_h, _ = swiglu_backward(h_NF2, grad_a.reshape(-1, grad_a.shape[-1]))
        return grad_h.view(ctx.shape)


def swiglu(h: Tensor) -> Tensor:
    """Differentiable ``silu(g)·u`` of ``h = [..., 2F]`` (gate half first): the fused kernels where
    they apply (contiguous CPU float32/float64), else eager ``F.silu(g) * u``."""
    if _lib(h) is not None:  # (a contiguous CPU float32/float64 tensor)
        return _SwiGLU.apply(h)
    gate, up = h.chunk(2, dim=-1)
    return F.silu(gate) * up
