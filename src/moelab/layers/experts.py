"""Expert weights and their grouped compute.

Weights are stored 3-D, one slice per expert, in the fused layout of
:class:`~moelab.layers.DenseFFN`: ``w13_EDF2: [E, D, 2F]`` (gate half then up half for SwiGLU;
``[E, D, F]`` otherwise) and ``w2_EFD: [E, F, D]``. This maps onto ``transformers``' fused
Mixtral/Qwen-MoE experts by a transpose and lets every compute backend read the same parameters:

* ``"loop"``: one matmul per expert over its contiguous slice of expert-sorted rows (never a loop
  over tokens), differentiated by autograd. The plain oracle the other backends are tested against.
* ``"fused"``: the same matmuls in one autograd function with a hand-written backward: each of
  its six matmuls (two forward, four backward) is one grouped call over all experts
  (:mod:`moelab.layers.grouped_gemm`: MKL's batch GEMM on CPU, else one ``mm`` per expert writing
  into preallocated row slices), and the activation runs once over all rows in one memory pass
  per direction (:mod:`moelab.layers.swiglu`). Fastest measured on CPU.
* ``"bmm"``: one ``torch.bmm`` over E equal blocks of rows; the MoE block asks the dispatcher for
  a padded permutation (:func:`moelab.layers.dispatch.permute` with ``pad_limit``) and falls back
  to ``fused`` when padding would cost more than ``PAD_LIMIT``.
* ``"grouped_mm"``: ``torch.nn.functional.grouped_mm`` over all experts at once (CUDA bf16 kernels;
  on CPU a loop fallback that needs int32 offsets and 16-byte-aligned strides).
* ``"auto"``: ``grouped_mm`` on CUDA with bf16 inputs; ``fused`` on CPU when the dtype has an MKL
  batch GEMM (float32/float64 with PyTorch's MKL build); otherwise ``bmm`` for experts narrower
  than ``d_model`` and ``fused`` for wider ones (one padded ``bmm`` beats many small parallel
  regions when the machine is shared, as measured before the batch GEMM existed).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moelab.layers.dense import activate, up_width
from moelab.layers.grouped_gemm import rows_matmul, rows_outer
from moelab.layers.swiglu import swiglu_backward, swiglu_forward
from moelab.native import mkl_gemm_batch

BACKENDS = ("auto", "loop", "fused", "bmm", "grouped_mm")

# Padded slots allowed per real row before the bmm backend falls back to unpadded rows.
PAD_LIMIT = 1.5


def check_backend(backend: str) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")


class GroupedExperts(nn.Module):
    """E independent FFN experts computed on expert-sorted rows.

    ``forward(x_ND, counts, weight_N=None)`` takes rows already sorted by expert (``counts[e]`` rows
    for expert ``e``, in order) and returns each row's expert output ``y_ND``, multiplied by its
    gate weight when ``weight_N`` is given (otherwise the caller's combine step applies it).
    """

    def __init__(
        self,
        num_experts: int,
        d_model: int,
        d_hidden: int,
        activation: str = "swiglu",
        init_std: float = 0.02,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        check_backend(backend)
        self.num_experts, self.d_model, self.d_hidden = num_experts, d_model, d_hidden
        self.activation, self.backend, self.init_std = activation, backend, init_std
        self.w13_EDF2 = nn.Parameter(
            torch.empty(num_experts, d_model, up_width(d_hidden, activation))
        )
        self.w2_EFD = nn.Parameter(torch.empty(num_experts, d_hidden, d_model))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.w13_EDF2, std=self.init_std)
        nn.init.normal_(self.w2_EFD, std=self.init_std)

    def pad_limit(self, x: Tensor) -> float:
        """How much padding the dispatcher may add to give this module equal blocks (0: none)."""
        return PAD_LIMIT if self.resolved_backend(x) == "bmm" else 0.0

    def resolved_backend(self, x: Tensor, counts: list[int] | None = None) -> str:
        """The backend that runs ``x``; ``bmm`` runs only equal blocks (else ``fused``)."""
        if self.backend == "auto":
            if x.is_cuda and x.dtype == torch.bfloat16:
                return "grouped_mm"
            if x.device.type == "cpu" and mkl_gemm_batch(x.dtype) is not None:
                return "fused"  # one grouped MKL GEMM per matmul: no padding needed
            backend = "bmm" if self.d_hidden < self.d_model else "fused"
            if backend == "bmm" and counts is not None and len(set(counts)) > 1:
                return "fused"
            return backend
        if self.backend == "bmm" and counts is not None and len(set(counts)) > 1:
            return "fused"  # unequal blocks (padding would have cost too much): per-expert matmuls
        return self.backend

    def forward(self, x_ND: Tensor, counts: list[int], weight_N: Tensor | None = None) -> Tensor:
        """Each row's expert output, multiplied by ``weight_N`` (its gate) when given.

        The gate is applied where the rows are narrowest: on the hidden activation (``F`` wide)
        for fine-grained experts narrower than ``D``, on the output otherwise; the two are equal
        because the down projection is linear.
        """
        backend = self.resolved_backend(x_ND, counts)
        if backend == "bmm":
            return self._bmm(x_ND, counts[0], weight_N)
        if backend == "grouped_mm":
            y_ND = self._grouped_mm(x_ND, counts)
        elif backend == "fused":
            w13, w2 = self.w13_EDF2.to(x_ND.dtype), self.w2_EFD.to(x_ND.dtype)
            gate_N = None
            if weight_N is not None and self.d_hidden < self.d_model:
                gate_N, weight_N = weight_N.to(x_ND.dtype), None  # applied on the hidden rows
            y_ND = FusedExpertLoop.apply(
                x_ND.contiguous(), w13, w2, gate_N, counts, self.activation
            )
        else:
            y_ND = self._loop(x_ND, counts)
        return y_ND if weight_N is None else y_ND * weight_N.to(y_ND.dtype)[:, None]

    def _loop(self, x_ND: Tensor, counts: list[int]) -> Tensor:
        # unbind/split once: indexing the 3-D parameter per expert (``w13[e]``) would make autograd
        # allocate and accumulate a full [E, D, F] zero gradient per expert.
        w13s = self.w13_EDF2.to(x_ND.dtype).unbind(0)
        w2s = self.w2_EFD.to(x_ND.dtype).unbind(0)
        outs = [
            activate(x_nD @ w13s[e], self.activation) @ w2s[e]
            for e, x_nD in enumerate(x_ND.split(counts))
            if counts[e]
        ]
        if not outs:  # no assignments at all (every ReLU output zero): keep the graph connected
            return x_ND.new_zeros(0, self.d_model) + 0.0 * (w13s[0].sum() + w2s[0].sum())
        return torch.cat(outs, dim=0) if len(outs) > 1 else outs[0]

    def _bmm(self, x_ND: Tensor, capacity: int, weight_N: Tensor | None) -> Tensor:
        w13, w2 = self.w13_EDF2.to(x_ND.dtype), self.w2_EFD.to(x_ND.dtype)
        x_ECD = x_ND.view(self.num_experts, capacity, self.d_model)
        a_ECF = activate(torch.bmm(x_ECD, w13), self.activation)
        on_hidden = weight_N is not None and self.d_hidden < self.d_model
        if on_hidden:
            a_ECF = a_ECF * weight_N.to(a_ECF.dtype).view(self.num_experts, capacity, 1)
        y_ECD = torch.bmm(a_ECF, w2)
        if weight_N is not None and not on_hidden:
            y_ECD = y_ECD * weight_N.to(y_ECD.dtype).view(self.num_experts, capacity, 1)
        return y_ECD.view(-1, self.d_model)

    def _grouped_mm(self, x_ND: Tensor, counts: list[int]) -> Tensor:
        offs = torch.tensor(counts, device=x_ND.device).cumsum(0).to(torch.int32)
        w13, w2 = self.w13_EDF2.to(x_ND.dtype), self.w2_EFD.to(x_ND.dtype)
        h = activate(F.grouped_mm(x_ND, w13, offs=offs), self.activation)
        return F.grouped_mm(h.contiguous(), w2, offs=offs)

    def extra_repr(self) -> str:
        return (
            f"num_experts={self.num_experts}, d_model={self.d_model}, d_hidden={self.d_hidden}, "
            f"activation={self.activation}, backend={self.backend}"
        )


def _activation_forward(
    h_NF2: Tensor, activation: str, gate_N: Tensor | None
) -> tuple[Tensor, Tensor]:
    """``(a, ga)``: the hidden activation and its gated rows (``a`` itself when no gate)."""
    if activation == "swiglu":
        return swiglu_forward(h_NF2, gate_N)
    a_NF = activate(h_NF2, activation)
    return a_NF, (a_NF if gate_N is None else a_NF * gate_N[:, None])


def _activation_backward(
    h: Tensor,
    grad_ga: Tensor,
    a: Tensor,
    gate_N: Tensor | None,
    activation: str,
    need_gate_grad: bool,
) -> tuple[Tensor, Tensor | None]:
    """``(grad_h, grad_gate)`` from the gradient of the gated activation ``ga = gate·act(h)``."""
    if activation == "swiglu":
        return swiglu_backward(h, grad_ga, a, gate_N, need_gate_grad)
    grad_gate_N = (grad_ga * a).sum(1) if gate_N is not None and need_gate_grad else None
    grad_a = grad_ga if gate_N is None else grad_ga * gate_N[:, None]
    with torch.enable_grad():
        h_ = h.detach().requires_grad_(True)
        (grad_h,) = torch.autograd.grad(activate(h_, activation), h_, grad_a)
    return grad_h, grad_gate_N


class FusedExpertLoop(torch.autograd.Function):
    """All experts' FFNs on expert-sorted rows, forward and backward by hand.

    Every per-expert matmul writes into a row slice of one preallocated buffer (``torch.mm(...,
    out=)``), weight gradients go straight into their ``[E, ...]`` slices, and the activation and
    its derivative run once over all rows. Compared with autograd over per-expert ops this removes
    a concatenation of the outputs, a stack of the weight gradients and one pass per expert over
    the activation. Saved for backward: the inputs and the pre-activation ``h`` (``[N, 2F]``).

    ``gate_N`` (optional) multiplies each row's hidden activation before the down projection: for
    experts narrower than ``d_model`` that is the cheapest place to apply the router's weights.
    """

    @staticmethod
    def forward(ctx, x_ND, w13_EDF2, w2_EFD, gate_N, counts, activation):  # type: ignore[override]
        n_rows = x_ND.shape[0]
        h_NF2 = rows_matmul(x_ND, w13_EDF2, counts, x_ND.new_empty(n_rows, w13_EDF2.shape[-1]))
        a_NF, ga_NF = _activation_forward(h_NF2, activation, gate_N)
        y_ND = rows_matmul(ga_NF, w2_EFD, counts, x_ND.new_empty(n_rows, w2_EFD.shape[-1]))
        ctx.save_for_backward(x_ND, w13_EDF2, w2_EFD, h_NF2, a_NF, gate_N)
        ctx.counts, ctx.activation = counts, activation
        return y_ND

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_y_ND):  # type: ignore[override]
        x_ND, w13_EDF2, w2_EFD, h_NF2, a_NF, gate_N = ctx.saved_tensors
        grad_y_ND = grad_y_ND.contiguous()
        counts = ctx.counts  # experts without rows get zero weight gradients (rows_outer)
        ga_NF = a_NF if gate_N is None else a_NF * gate_N[:, None]
        grad_w2 = rows_outer(ga_NF, grad_y_ND, counts, torch.empty_like(w2_EFD))
        # gradient of the (gated) hidden rows
        grad_ga_NF = rows_matmul(grad_y_ND, w2_EFD, counts, torch.empty_like(a_NF), True)
        grad_h_NF2, grad_gate_N = _activation_backward(
            h_NF2, grad_ga_NF, a_NF, gate_N, ctx.activation, ctx.needs_input_grad[3]
        )
        grad_w13 = rows_outer(x_ND, grad_h_NF2, counts, torch.empty_like(w13_EDF2))
        grad_x_ND = rows_matmul(grad_h_NF2, w13_EDF2, counts, torch.empty_like(x_ND), True)
        return grad_x_ND, grad_w13, grad_w2, grad_gate_N, None, None
