"""Row-wise Adam for the product-key tables: one second-moment scalar per row, optionally bf16
first moments (``optim.table_optimizer: rowwise`` / ``rowwise_bf16``).

The exact lazy AdamW of :mod:`moelab.train.optim` keeps two ``[N, D]`` float32 moments per table
and moves 7 × 4 bytes per element of every touched row (gradient read; parameter, first and second
moment read and written). At 1024² experts that is the step's cost floor. Large embedding tables
(recommender systems) are usually trained with *row-wise* second moments instead - one scalar per
row, the mean over the row of ``g²`` (row-wise AdaGrad / Adam) - since the rows of such a table
are trained as units and their elements see gradients of similar size. Per touched row ``r`` with
its own step count ``t_r`` (as in the lazy AdamW):

    m_r ← β1·m_r + (1−β1)·g_r                       ([D], float32, or bfloat16 in ``rowwise_bf16``)
    v_r ← β2·v_r + (1−β2)·mean_d(g_r²)              (one float32 scalar per row)
    p_r ← p_r·(1 − lr·λ) − lr · (m_r / (1−β1^t_r)) / (sqrt(v_r / (1−β2^t_r)) + ε)

Bytes per element of a touched row: 20 (``rowwise``) or 16 (``rowwise_bf16``) instead of 28; state
memory ``N·D·4 + 8·N`` or ``N·D·2 + 8·N`` bytes instead of ``2·N·D·4 + 4·N``. The second moment
stays float32 in both: ``1 − β2`` = 0.001 is below bfloat16's resolution, so a bfloat16 ``v``
would never decay (see :mod:`moelab.train.optim`). The bf16 first moment is rounded to nearest
even after each update; the update itself uses the unrounded float32 value.

This is a different optimizer, not an approximation switch: on peer-tiny its quality against the
exact default is documented in docs/peer.md. Untouched rows are never changed (lazy), as with the
default. Dense parameters always get exact AdamW.
"""

from __future__ import annotations

import torch
from torch import Tensor

from moelab.native import adamw_state_dtype, advise_huge_pages, load_c_kernel
from moelab.train.adamw_rows import call_row_kernel

__all__ = ["ROWWISE_MODES", "moment_dtype", "rowwise_applies", "rowwise_step", "rowwise_update"]

ROWWISE_MODES = ("rowwise", "rowwise_bf16")
_ROW_CHUNK = 1024  # rows per chunk of the eager path (bounds scratch memory)

# One pass over each touched row (two over its gradient): same equations as _rowwise_eager.
_ROWWISE_C = r"""
#include <math.h>
#include <stdint.h>
#include <string.h>
static inline float bf16_get(const uint16_t* a, int64_t i) {
  uint32_t u = (uint32_t)a[i] << 16; float f; memcpy(&f, &u, 4); return f;
}
static inline void bf16_put(uint16_t* a, int64_t i, float f) {  /* torch's rounding */
  uint32_t u; memcpy(&u, &f, 4);
  const uint32_t r = (u + 0x7FFF + ((u >> 16) & 1)) >> 16;
  a[i] = (uint16_t)(f != f ? 0x7FC0 : r);  /* a select, not a branch: the loop vectorises */
}
void rowwise_f32(float* p, void* m, int m_bf16, float* v, int32_t* step, const int64_t* rows,
                 const float* g, int64_t n_rows, int64_t dim, double lr, double beta1,
                 double beta2, double eps, double wd, int nth) {
  #pragma omp parallel for num_threads(nth) schedule(static)
  for (int64_t i = 0; i < n_rows; ++i) {
    const int64_t r = rows[i];
    const int32_t t = step[r] + 1;
    step[r] = t;
    const float bc1 = (float)(1.0 - pow(beta1, (double)t));
    const float bc2s = sqrtf((float)(1.0 - pow(beta2, (double)t)));
    const float w1 = (float)(1.0 - beta1);
    const float decay = (float)(1.0 - lr * wd), nlr = (float)(-lr);
    const float* gr = g + i * dim;
    float ss = 0;
    #pragma omp simd reduction(+:ss)
    for (int64_t d = 0; d < dim; ++d) ss += gr[d] * gr[d];
    const float vi = v[r] * (float)beta2 + (float)(1.0 - beta2) * (ss / (float)dim);
    v[r] = vi;
    const float denom = sqrtf(vi) / bc2s + (float)eps;
    const float step_scale = nlr / (bc1 * denom);  /* one multiply per element, no division */
    float* pr = p + r * dim;
    if (m_bf16) {
      uint16_t* mr = (uint16_t*)m + r * dim;
      #pragma omp simd
      for (int64_t d = 0; d < dim; ++d) {
        const float m0 = bf16_get(mr, d);
        const float mi = m0 + w1 * (gr[d] - m0);
        bf16_put(mr, d, mi);
        pr[d] = pr[d] * decay + step_scale * mi;
      }
    } else {
      float* mr = (float*)m + r * dim;
      #pragma omp simd
      for (int64_t d = 0; d < dim; ++d) {
        const float mi = mr[d] + w1 * (gr[d] - mr[d]);
        mr[d] = mi;
        pr[d] = pr[d] * decay + step_scale * mi;
      }
    }
  }
}
"""


def moment_dtype(mode: str, param_dtype: torch.dtype) -> torch.dtype:
    """dtype of the first moment: bfloat16 in ``rowwise_bf16``, else AdamW's state dtype."""
    return torch.bfloat16 if mode == "rowwise_bf16" else adamw_state_dtype(param_dtype)


def _state(state: dict, p: Tensor, mode: str) -> tuple[Tensor, Tensor, Tensor]:
    """``row_step``, ``exp_avg`` and ``exp_avg_sq_row`` of ``p``, created (zero) or converted.

    A table whose state is AdamW's (``exp_avg_sq`` ``[N, D]``, e.g. resumed from a run with the
    default) continues with each row's mean second moment; a first moment of another dtype (the
    other row-wise mode, or a checkpoint cast on load) is converted.
    """
    cdt, mdt = adamw_state_dtype(p.dtype), moment_dtype(mode, p.dtype)
    N = p.shape[0]
    if "step" in state and "row_step" not in state:  # so far dense grads: all rows stepped alike
        state["row_step"] = torch.full(
            (N,), int(state.pop("step")), dtype=torch.int32, device=p.device
        )
    if "row_step" not in state:
        state["row_step"] = torch.zeros(N, dtype=torch.int32, device=p.device)
    if "exp_avg" not in state:  # huge pages: rows are read at random (PEER/PKM)
        buf = torch.empty_like(p, dtype=mdt, memory_format=torch.contiguous_format)
        state["exp_avg"] = advise_huge_pages(buf).zero_()
    if "exp_avg_sq_row" not in state:
        old = state.pop("exp_avg_sq", None)
        row = None if old is None else old.reshape(N, -1).to(cdt).mean(1)
        state["exp_avg_sq_row"] = torch.zeros(N, dtype=cdt, device=p.device) if row is None else row
    if state["exp_avg"].dtype != mdt:
        state["exp_avg"] = state["exp_avg"].to(mdt).contiguous()
    if state["exp_avg_sq_row"].dtype != cdt:
        state["exp_avg_sq_row"] = state["exp_avg_sq_row"].to(cdt)
    return state["row_step"], state["exp_avg"], state["exp_avg_sq_row"]


def rowwise_applies(state: dict, p: Tensor, grad: Tensor, mode: str) -> bool:
    """Whether :func:`rowwise_step` updates ``p``: a row-wise mode and a sparse gradient, or a
    table whose state is already row-wise. Row-wise state in another mode is refused (its
    ``[N, D]`` second moment no longer exists)."""
    rowwise_state = "exp_avg_sq_row" in state
    if mode in ROWWISE_MODES:
        return grad.is_sparse or rowwise_state
    if rowwise_state:
        raise ValueError(
            f"the optimizer state of a {tuple(p.shape)} table is row-wise (optim.table_optimizer: "
            f"{ROWWISE_MODES}); continue with one of those, got {mode!r}"
        )
    return False


def rowwise_step(
    state: dict, p: Tensor, grad: Tensor, hp: tuple, mode: str, use_c_kernel: bool = True
) -> None:
    """One row-wise step of ``p`` from a *coalesced* sparse row gradient (its rows) or a dense
    gradient (every row touched)."""
    if grad.is_sparse:
        if grad.sparse_dim() != 1 or grad.shape != p.shape:
            raise ValueError(
                f"sparse gradient must select rows (sparse_dim 1) of the parameter, got sparse_dim "
                f"{grad.sparse_dim()} and shape {tuple(grad.shape)} for a {tuple(p.shape)} "
                "parameter"
            )
        idx, vals = grad.indices()[0], grad.values()
    else:
        idx, vals = torch.arange(p.shape[0], device=p.device), grad
    if idx.numel():
        rowwise_update(state, p, idx, vals, hp, mode, use_c_kernel)


def rowwise_update(
    state: dict,
    p: Tensor,
    idx_U: Tensor,
    g_UD: Tensor,
    hp: tuple[float, float, float, float, float],
    mode: str,
    use_c_kernel: bool = True,
) -> None:
    """Row-wise Adam on the unique rows ``idx_U`` of ``p`` with gradient rows ``g_UD``.

    ``hp`` = (lr, β1, β2, ε, weight decay); ``state`` is the optimizer's state dict for ``p``.
    """
    if mode not in ROWWISE_MODES:
        raise ValueError(f"row-wise mode must be one of {ROWWISE_MODES}, got {mode!r}")
    row_step, m, v = _state(state, p, mode)
    N = p.shape[0]
    p2, m2 = p.view(N, -1), m.view(N, -1)
    g2 = g_UD.reshape(idx_U.numel(), -1)
    if use_c_kernel and _c_update(p2, m2, v, row_step, idx_U, g2, hp):
        return
    _rowwise_eager(p2, m2, v, row_step, idx_U, g2, hp)


def _c_update(
    p2: Tensor, m2: Tensor, v: Tensor, row_step: Tensor, idx_U: Tensor, g2: Tensor, hp: tuple
) -> bool:
    """Fused C row update (float32 parameters); False when unavailable."""
    if p2.device.type != "cpu" or p2.dtype != torch.float32 or not p2.is_contiguous():
        return False
    if m2.dtype not in (torch.float32, torch.bfloat16) or v.dtype != torch.float32:
        return False
    lib = load_c_kernel("rowwise_adam", _ROWWISE_C)
    if lib is None:
        return False
    bf16 = int(m2.dtype == torch.bfloat16)
    call_row_kernel(lib.rowwise_f32, p2, (m2, bf16, v), row_step, idx_U, g2, hp)
    return True


def _rowwise_eager(
    p2: Tensor, m2: Tensor, v: Tensor, row_step: Tensor, idx_U: Tensor, g2: Tensor, hp: tuple
) -> None:
    """The same update in torch ops, over row chunks (bounded scratch)."""
    lr, beta1, beta2, eps, wd = hp
    cdt = v.dtype
    for start in range(0, idx_U.numel(), _ROW_CHUNK):
        rows = idx_U[start : start + _ROW_CHUNK]
        gc = g2[start : start + _ROW_CHUNK].to(cdt)
        t = row_step.index_select(0, rows) + 1
        row_step.index_copy_(0, rows, t)
        t_f = t.to(cdt)
        bc1 = (1.0 - torch.pow(beta1, t_f)).unsqueeze(1)
        bc2_sqrt = (1.0 - torch.pow(beta2, t_f)).sqrt_()
        mc = m2.index_select(0, rows).to(cdt).lerp_(gc, 1.0 - beta1)
        m2.index_copy_(0, rows, mc.to(m2.dtype))
        vr = v.index_select(0, rows).mul_(beta2).add_(gc.square().mean(1), alpha=1.0 - beta2)
        v.index_copy_(0, rows, vr)
        denom = (vr.sqrt() / bc2_sqrt).add_(eps).unsqueeze(1)
        pc = p2.index_select(0, rows).to(cdt)
        if wd != 0.0:
            pc.mul_(1.0 - lr * wd)
        pc.addcdiv_(mc.div_(bc1), denom, value=-lr)
        p2.index_copy_(0, rows, pc.to(p2.dtype))
