"""The optimizer: AdamW (Loshchilov & Hutter 2019) that also takes sparse, row-wise gradients.

One :class:`torch.optim.Optimizer` object with two param groups (``decay`` and ``no_decay``) so any
LR scheduler works unchanged. Weight decay goes to matrices only (``ndim >= 2``); norms, biases and
other vectors are never decayed.

Dense gradients get the textbook AdamW update (identical to ``torch.optim.AdamW``,
``amsgrad=False``):

    p ← p·(1 − lr·λ);  m ← β1·m + (1−β1)·g;  v ← β2·v + (1−β2)·g²
    p ← p − lr · (m / (1−β1^t)) / (sqrt(v / (1−β2^t)) + ε)

Sparse gradients (``torch.sparse_coo`` with ``sparse_dim == 1``: a set of rows of a ``[N, D]``
table, as produced by ``nn.Embedding(sparse=True)``, ``F.embedding_bag(sparse=True)`` and the PEER /
PKM layers) get **lazy** AdamW: only the rows present in the gradient are touched. For each touched
row the same update is applied with that row's *own* step count ``t_row`` (number of steps in which
the row received a gradient) in the bias corrections, and decoupled weight decay is applied to the
touched rows only. Equivalently: every row follows exactly the AdamW trajectory it would follow if
the optimizer only ever saw the steps in which that row was retrieved. A row never retrieved is
never changed (no decay, no moment decay). With every row touched in every step this is exactly
dense AdamW. Rows listed in a sparse gradient with an explicit zero value count as touched.
``sparse_mode="dense"`` turns the lazy update off: rows absent from a sparse gradient get a zero
gradient, so the table gets the textbook update above (every row's moments decay and every row is
decayed every step), at O(N·D) cost per step; it runs as the lazy update with every row touched.

Precision: the arithmetic and the moments are float32 for bfloat16 / float16 parameters (float64
for float64 ones); only the updated parameter is rounded back to its dtype. In bfloat16,
``0.999**t`` rounds to exactly 1, so a bias correction computed in the parameter's dtype would be 0
forever, and ``β2·v`` rounds back to ``v``, so a bfloat16 second moment never decays.

Optimizer state for a sparse ``[N, D]`` table: ``exp_avg`` and ``exp_avg_sq`` (``[N, D]``, float32
or float64 as above) and ``row_step`` (int32 ``[N]``); the update runs in row chunks so its scratch
memory stays bounded regardless of N. That row update (a fused C kernel and its eager reference)
lives in :mod:`moelab.train.adamw_rows`.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Literal

import torch
from torch import Tensor, nn

from moelab.native import adamw_state_dtype, advise_huge_pages
from moelab.train.adamw_rows import update_rows
from moelab.train.rowwise import ROWWISE_MODES, rowwise_applies, rowwise_step

__all__ = [
    "SPARSE_MODES",
    "SparseAdamW",
    "build_optimizer",
    "clip_grad_norm_",
    "optimizer_state_bytes",
]

# how SparseAdamW treats sparse row gradients (module docstring; row-wise: moelab.train.rowwise)
SPARSE_MODES = ("lazy", "dense", *ROWWISE_MODES)
SparseMode = Literal["lazy", "dense", "rowwise", "rowwise_bf16"]

_DENSE_CHUNK = 8192  # rows per densified gradient chunk of sparse_mode="dense"


def _coalesced(g: Tensor) -> Tensor:
    """Coalesce a sparse row gradient, cheaply when its rows are already sorted and unique.

    Autograd drops the ``is_coalesced`` flag of gradients built coalesced (PEER/PKM), so check the
    O(rows) invariant first instead of paying for a sort.
    """
    if g.is_coalesced():
        return g
    idx = g._indices()[0]
    if g.sparse_dim() == 1 and bool((idx[1:] > idx[:-1]).all()):
        return g._coalesced_(True)
    return g.coalesce()


def _param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Split trainable parameters into ``decay`` (matrices) and ``no_decay`` (vectors/scalars)."""
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    seen: set[int] = set()
    for p in model.parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        (decay if p.ndim >= 2 else no_decay).append(p)
    groups = []
    if decay:
        groups.append({"params": decay, "weight_decay": weight_decay, "name": "decay"})
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0, "name": "no_decay"})
    return groups


class SparseAdamW(torch.optim.Optimizer):
    """AdamW with decoupled weight decay; dense grads exact, sparse (row) grads lazy per row.

    See the module docstring for the update equations and the lazy semantics. ``sparse_mode``:
    ``"lazy"`` (default) updates only the rows in a sparse gradient; ``"dense"`` gives tables with
    sparse gradients the textbook AdamW update of every row. It is an attribute of the optimizer,
    not of its param groups, so a resumed run uses the mode it was built with, not the saved one.
    """

    def __init__(
        self,
        params: Iterable[nn.Parameter] | Iterable[dict],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        sparse_mode: SparseMode = "lazy",
    ) -> None:
        if sparse_mode not in SPARSE_MODES:
            raise ValueError(f"sparse_mode must be one of {SPARSE_MODES}, got {sparse_mode!r}")
        if lr < 0.0:
            raise ValueError(f"lr must be >= 0, got {lr}")
        if not (0.0 <= betas[0] < 1.0 and 0.0 <= betas[1] < 1.0):
            raise ValueError(f"betas must each be in [0, 1), got {betas}")
        if eps < 0.0:
            raise ValueError(f"eps must be >= 0, got {eps}")
        if weight_decay < 0.0:
            raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
        super().__init__(params, defaults)
        self.use_c_kernel = True  # fused C row update when it compiles; eager otherwise
        self.sparse_mode: SparseMode = sparse_mode

    def load_state_dict(self, state_dict: dict) -> None:
        """``Optimizer.load_state_dict``, keeping ``row_step`` int32 and the moments float32.

        torch casts every non-``step`` state tensor of a floating-point parameter to the
        parameter's dtype: ``row_step`` would become float (bfloat16 cannot even count past 256,
        and the C kernel reads int32) and the float32 moments of a 16-bit parameter would be
        rounded to 16 bits. The saved tensors are taken again, in the dtypes this optimizer uses.
        """
        super().load_state_dict(state_dict)
        saved_ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        params = [p for g in self.param_groups for p in g["params"]]
        for pid, p in zip(saved_ids, params, strict=True):
            saved, state = state_dict["state"].get(pid), self.state.get(p)
            if saved is None or state is None:
                continue
            for key, dtype in (
                ("row_step", torch.int32),
                ("exp_avg", adamw_state_dtype(p.dtype)),
                ("exp_avg_sq", adamw_state_dtype(p.dtype)),
                ("exp_avg_sq_row", adamw_state_dtype(p.dtype)),  # row-wise modes
            ):
                if key in saved:
                    value = saved[key]
                    if key == "row_step" and value.is_floating_point():
                        value = value.round()  # a checkpoint written before row_step was kept int
                    state[key] = value.to(device=p.device, dtype=dtype)

    @torch.no_grad()
    def step(self, closure=None):  # noqa: ANN001 - torch's Optimizer signature
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr = float(group["lr"])
            beta1, beta2 = group["betas"]
            eps, wd = float(group["eps"]), float(group["weight_decay"])
            for p in group["params"]:
                if p.grad is None:
                    continue
                if rowwise_applies(self.state[p], p, p.grad, self.sparse_mode):
                    g = _coalesced(p.grad) if p.grad.is_sparse else p.grad
                    hp = (lr, beta1, beta2, eps, wd)
                    rowwise_step(self.state[p], p, g, hp, self.sparse_mode, self.use_c_kernel)
                elif p.grad.is_sparse and self.sparse_mode == "dense":
                    self._all_rows_step(p, p.grad, lr, beta1, beta2, eps, wd)
                elif p.grad.is_sparse:
                    self._sparse_step(p, p.grad, lr, beta1, beta2, eps, wd)
                else:
                    self._dense_step(p, p.grad, lr, beta1, beta2, eps, wd)
        return loss

    def _dense_step(
        self, p: Tensor, g: Tensor, lr: float, beta1: float, beta2: float, eps: float, wd: float
    ) -> None:
        state = self.state[p]
        if "row_step" in state:  # a table that usually gets sparse grads: treat as all rows touched
            idx = torch.arange(p.shape[0], device=p.device)
            self._rows_update(p, idx, g, lr, beta1, beta2, eps, wd)
            return
        cdt = adamw_state_dtype(p.dtype)
        if not state:
            state["step"] = torch.zeros((), dtype=torch.float32)
            for name in ("exp_avg", "exp_avg_sq"):
                state[name] = torch.zeros_like(p, dtype=cdt, memory_format=torch.preserve_format)
        state["step"] += 1
        t = float(state["step"])
        m, v = state["exp_avg"], state["exp_avg_sq"]
        pc = p if p.dtype == cdt else p.to(cdt)  # 16-bit parameters: update a float32 copy
        g = g.to(cdt)
        if wd != 0.0:
            pc.mul_(1.0 - lr * wd)
        m.lerp_(g, 1.0 - beta1)
        v.mul_(beta2).addcmul_(g, g, value=1.0 - beta2)
        bc1 = 1.0 - beta1**t
        bc2 = 1.0 - beta2**t
        denom = (v.sqrt() / math.sqrt(bc2)).add_(eps)
        pc.addcdiv_(m, denom, value=-lr / bc1)
        if pc is not p:
            p.copy_(pc)

    def _sparse_step(
        self, p: Tensor, g: Tensor, lr: float, beta1: float, beta2: float, eps: float, wd: float
    ) -> None:
        if g.sparse_dim() != 1 or g.shape != p.shape:
            raise ValueError(
                f"sparse gradient must select rows (sparse_dim 1) of the parameter, got sparse_dim "
                f"{g.sparse_dim()} and shape {tuple(g.shape)} for a {tuple(p.shape)} parameter"
            )
        g = _coalesced(g)  # sums duplicate rows (nn.Embedding); cheap for PEER/PKM gradients
        idx = g.indices()[0]
        if idx.numel() == 0:
            return
        self._rows_update(p, idx, g.values(), lr, beta1, beta2, eps, wd)

    def _all_rows_step(
        self, p: Tensor, g: Tensor, lr: float, beta1: float, beta2: float, eps: float, wd: float
    ) -> None:
        """``sparse_mode="dense"``: every row updated, rows absent from ``g`` with a zero gradient.

        That is the lazy update with every row touched (exactly AdamW), run over row chunks whose
        gradient is densified one at a time: no ``[N, D]`` gradient is allocated (at 65k x 512 its
        page faults alone cost more than the fused update) and the C kernel does one pass.
        """
        if g.sparse_dim() != 1 or g.shape != p.shape:
            self._sparse_step(p, g, lr, beta1, beta2, eps, wd)  # raises the shape error
            return
        g = _coalesced(g)
        idx, vals = g.indices()[0], g.values().reshape(g.indices().shape[1], -1)
        n_rows = p.shape[0]
        starts = torch.arange(0, n_rows + _DENSE_CHUNK, _DENSE_CHUNK, device=idx.device)
        bounds = torch.searchsorted(idx, starts.clamp_(max=n_rows)).tolist()
        for c, start in enumerate(range(0, n_rows, _DENSE_CHUNK)):
            end = min(n_rows, start + _DENSE_CHUNK)
            a, b = bounds[c], bounds[c + 1]
            g_chunk = vals.new_zeros(end - start, vals.shape[1])
            g_chunk.index_copy_(0, idx[a:b] - start, vals[a:b])
            rows = torch.arange(start, end, device=p.device)
            self._rows_update(p, rows, g_chunk, lr, beta1, beta2, eps, wd)

    def _rows_update(
        self,
        p: Tensor,
        idx_U: Tensor,
        g_UD: Tensor,
        lr: float,
        beta1: float,
        beta2: float,
        eps: float,
        wd: float,
    ) -> None:
        """Lazy AdamW on the (unique) rows ``idx_U`` of ``p`` with their gradient rows ``g_UD``."""
        state = self.state[p]
        if "step" in state and "row_step" not in state:
            # a parameter that so far got dense grads: every row has had `step` updates.
            state["row_step"] = torch.full(
                (p.shape[0],), int(state.pop("step")), dtype=torch.int32, device=p.device
            )
        cdt = adamw_state_dtype(p.dtype)
        if not state:
            state["row_step"] = torch.zeros(p.shape[0], dtype=torch.int32, device=p.device)
            for name in ("exp_avg", "exp_avg_sq"):  # huge pages: random row access (PEER/PKM)
                buf = torch.empty_like(p, dtype=cdt, memory_format=torch.contiguous_format)
                state[name] = advise_huge_pages(buf).zero_()
        row_step, m, v = state["row_step"], state["exp_avg"], state["exp_avg_sq"]
        p2 = p.view(p.shape[0], -1)
        m2, v2 = m.view(p.shape[0], -1), v.view(p.shape[0], -1)
        g2 = g_UD.reshape(idx_U.numel(), -1)
        hp = (lr, beta1, beta2, eps, wd)
        update_rows(p2, m2, v2, row_step, idx_U, g2, hp, use_c_kernel=self.use_c_kernel)


def build_optimizer(
    model: nn.Module,
    lr: float,
    weight_decay: float,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    table_optimizer: SparseMode = "lazy",
) -> SparseAdamW:
    """One AdamW over ``model`` (decay on matrices only) that also handles sparse row gradients.

    Groups are named ``"decay"`` / ``"no_decay"`` (``group["name"]``); LR schedulers act on both.
    ``table_optimizer`` is :class:`SparseAdamW`'s ``sparse_mode`` for the tables that get sparse
    row gradients (PEER/PKM): ``"lazy"`` (only retrieved rows), ``"dense"`` (textbook AdamW), or
    ``"rowwise"`` / ``"rowwise_bf16"`` (lazy row-wise Adam: one second moment per row, float32 or
    bfloat16 first moments; :mod:`moelab.train.rowwise`).
    """
    return SparseAdamW(
        _param_groups(model, weight_decay),
        lr=lr,
        betas=betas,
        eps=eps,
        weight_decay=weight_decay,
        sparse_mode=table_optimizer,
    )


@torch.no_grad()
def clip_grad_norm_(parameters: Iterable[Tensor], max_norm: float) -> Tensor:
    """``torch.nn.utils.clip_grad_norm_`` (L2) that also accepts sparse gradients.

    Sparse gradients are coalesced first (duplicate rows summed) so the norm is that of the
    equivalent dense gradient. Returns the total norm before clipping (float32 scalar).
    """
    params = [p for p in parameters if p.grad is not None]
    if not params:
        return torch.zeros(())
    norms_sq = []
    for p in params:
        if p.grad.is_sparse:
            p.grad = _coalesced(p.grad)
            norms_sq.append(p.grad._values().float().pow(2).sum())
        else:
            norms_sq.append(p.grad.float().pow(2).sum())
    total = torch.stack([n.to(norms_sq[0].device) for n in norms_sq]).sum().sqrt()
    coef = (max_norm / (total + 1e-6)).clamp(max=1.0)
    for p in params:
        if p.grad.is_sparse:
            p.grad._values().mul_(coef.to(p.grad.device, p.grad.dtype))
        else:
            p.grad.mul_(coef.to(p.grad.device, p.grad.dtype))
    return total


def optimizer_state_bytes(p: Tensor, sparse: bool = False) -> int:
    """Bytes of AdamW state for ``p``: two moments in :func:`~moelab.native.adamw_state_dtype`
    (+ an int32 row-step per row when sparse)."""
    moments = 2 * p.numel() * torch.empty((), dtype=adamw_state_dtype(p.dtype)).element_size()
    return moments + (4 * p.shape[0] if sparse else 0)
