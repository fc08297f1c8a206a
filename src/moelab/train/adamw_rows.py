"""The lazy AdamW row update of :class:`~moelab.train.optim.SparseAdamW`, on rows of a table.

Split from the optimizer because it is the one memory-bound loop of a PEER/PKM step: a fused C
kernel (:func:`moelab.native.load_c_kernel`, one pass that reads g, p, m, v and writes p, m, v of
each touched row) and the eager PyTorch loop it replaces (about 15 passes), which is the fallback
(other devices and dtypes, no compiler, ``MOELAB_NO_C_KERNELS=1``) and the reference the tests
compare it with. Both apply the update of the optimizer's module docstring with each row's own
step count ``t_row`` in the bias corrections.
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable

import torch
from torch import Tensor

from moelab.native import adamw_state_dtype, load_c_kernel

_ROW_CHUNK = 1024  # rows per chunk of the eager path (bounds scratch memory)

# One pass over each touched row: read g, p, m, v; write p, m, v (the eager path needs ~15 passes).
# Same equations and operation order as the eager loop of update_rows.
_SPARSE_ADAMW_C = r"""
#include <math.h>
#include <stdint.h>
#define DEFINE(NAME, T, SQRT)                                                                   \
void NAME(T* p, T* m, T* v, int32_t* step, const int64_t* rows, const T* g, int64_t n_rows,   \
          int64_t dim, double lr, double beta1, double beta2, double eps, double wd, int nth) { \
  _Pragma("omp parallel for num_threads(nth) schedule(static)")                                \
  for (int64_t i = 0; i < n_rows; ++i) {                                                        \
    const int64_t r = rows[i];                                                                  \
    const int32_t t = step[r] + 1;                                                              \
    step[r] = t;                                                                                \
    const T bc1 = (T)(1.0 - pow(beta1, (double)t));                                             \
    const T bc2s = SQRT((T)(1.0 - pow(beta2, (double)t)));                                      \
    const T w1 = (T)(1.0 - beta1), b2 = (T)beta2, w2 = (T)(1.0 - beta2);                        \
    const T decay = (T)(1.0 - lr * wd), nlr = (T)(-lr), e = (T)eps;                             \
    T* pr = p + r * dim; T* mr = m + r * dim; T* vr = v + r * dim;                              \
    const T* gr = g + i * dim;                                                                  \
    for (int64_t d = 0; d < dim; ++d) {                                                         \
      const T gi = gr[d];                                                                       \
      const T mi = mr[d] + w1 * (gi - mr[d]);                                                   \
      const T vi = vr[d] * b2 + w2 * gi * gi;                                                   \
      mr[d] = mi; vr[d] = vi;                                                                   \
      pr[d] = pr[d] * decay + nlr * ((mi / bc1) / (SQRT(vi) / bc2s + e));                       \
    }                                                                                           \
  }                                                                                             \
}
DEFINE(sparse_adamw_f32, float, sqrtf)
DEFINE(sparse_adamw_f64, double, sqrt)
"""
_C_FUNCS = {torch.float32: "sparse_adamw_f32", torch.float64: "sparse_adamw_f64"}


def call_row_kernel(
    fn: Callable[..., None],
    p2: Tensor,
    state: tuple[Tensor | int, ...],
    row_step: Tensor,
    idx_U: Tensor,
    g2: Tensor,
    hp: tuple,
) -> None:
    """Call a C row-update kernel of the shared signature ``(T* p, <state>, int32_t* step,
    const int64_t* rows, const T* g, int64_t n_rows, int64_t dim, double lr, double beta1,
    double beta2, double eps, double wd, int nth)``: ``state`` holds the kernel's own moment
    tensors (passed as pointers) and int flags; the rows go as int64, the gradient rows in
    ``p2``'s dtype, both contiguous."""
    idx = idx_U.to(torch.int64).contiguous()
    g = g2.to(p2.dtype).contiguous()
    ptr = ctypes.c_void_p
    own = [ptr(a.data_ptr()) if isinstance(a, Tensor) else ctypes.c_int(a) for a in state]
    fn(
        ptr(p2.data_ptr()),
        *own,
        ptr(row_step.data_ptr()),
        ptr(idx.data_ptr()),
        ptr(g.data_ptr()),
        ctypes.c_int64(idx.numel()),
        ctypes.c_int64(p2.shape[1]),
        *(ctypes.c_double(x) for x in hp),
        ctypes.c_int(torch.get_num_threads()),
    )


def _c_update(
    p2: Tensor, m2: Tensor, v2: Tensor, row_step: Tensor, idx_U: Tensor, g2: Tensor, hp: tuple
) -> bool:
    """Fused C row update; False when the kernel or the dtype/layout is unavailable."""
    if p2.device.type != "cpu" or p2.dtype not in _C_FUNCS or not p2.is_contiguous():
        return False
    if m2.dtype != p2.dtype or v2.dtype != p2.dtype:
        return False
    lib = load_c_kernel("sparse_adamw", _SPARSE_ADAMW_C)
    if lib is None:
        return False
    call_row_kernel(getattr(lib, _C_FUNCS[p2.dtype]), p2, (m2, v2), row_step, idx_U, g2, hp)
    return True


def update_rows(
    p2: Tensor,
    m2: Tensor,
    v2: Tensor,
    row_step: Tensor,
    idx_U: Tensor,
    g2: Tensor,
    hp: tuple[float, float, float, float, float],
    *,
    use_c_kernel: bool = True,
) -> None:
    """Lazy AdamW, in place, on the unique rows ``idx_U`` of the 2-D views ``p2`` (parameter),
    ``m2``/``v2`` (moments) with gradient rows ``g2`` (``[U, D]``); ``row_step`` (int32 ``[N]``)
    counts each row's updates. ``hp``: ``(lr, beta1, beta2, eps, weight_decay)``."""
    if use_c_kernel and _c_update(p2, m2, v2, row_step, idx_U, g2, hp):
        return
    lr, beta1, beta2, eps, wd = hp
    cdt = adamw_state_dtype(p2.dtype)
    decay = 1.0 - lr * wd
    for start in range(0, idx_U.numel(), _ROW_CHUNK):
        rows = idx_U[start : start + _ROW_CHUNK]
        gc = g2[start : start + _ROW_CHUNK].to(cdt)
        t = row_step.index_select(0, rows) + 1
        row_step.index_copy_(0, rows, t)
        t_f = t.to(cdt).unsqueeze(1)
        bc1 = 1.0 - torch.pow(beta1, t_f)  # [R, 1] per-row bias corrections
        bc2_sqrt = (1.0 - torch.pow(beta2, t_f)).sqrt_()
        mc = m2.index_select(0, rows).lerp_(gc, 1.0 - beta1)
        vc = v2.index_select(0, rows).mul_(beta2).addcmul_(gc, gc, value=1.0 - beta2)
        m2.index_copy_(0, rows, mc)
        v2.index_copy_(0, rows, vc)
        pc = p2.index_select(0, rows).to(cdt)
        if wd != 0.0:
            pc.mul_(decay)
        denom = vc.sqrt_().div_(bc2_sqrt).add_(eps)  # vc is scratch from here on
        pc.addcdiv_(mc.div_(bc1), denom, value=-lr)
        p2.index_copy_(0, rows, pc.to(p2.dtype))
