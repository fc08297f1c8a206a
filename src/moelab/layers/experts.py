"""Expert weights and their grouped compute.

Weights are stored 3-D, one slice per expert, in the fused layout of
:class:`~moelab.layers.DenseFFN`: ``w13_EDF2: [E, D, 2F]`` (gate half then up half for SwiGLU;
``[E, D, F]`` otherwise) and ``w2_EFD: [E, F, D]``. This maps onto ``transformers``' fused
Mixtral/Qwen-MoE experts by a transpose and lets every compute backend read the same parameters:

* ``"loop"``: one matmul per expert over its contiguous slice of expert-sorted rows (never a loop
  over tokens). Fastest measured on CPU, and the oracle the other backends are tested against.
* ``"grouped_mm"``: ``torch.nn.functional.grouped_mm`` over all experts at once (CUDA bf16 kernels;
  on CPU a loop fallback that needs int32 offsets and 16-byte-aligned strides).
* ``"auto"``: ``grouped_mm`` on CUDA with bf16 inputs, ``loop`` otherwise.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moelab.layers.dense import activate, up_width

BACKENDS = ("auto", "loop", "grouped_mm")


def check_backend(backend: str) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")


class GroupedExperts(nn.Module):
    """E independent FFN experts computed on expert-sorted rows.

    ``forward(x_ND, counts)`` takes rows already sorted by expert (``counts[e]`` rows for expert
    ``e``, in order) and returns each row's expert output ``y_ND``; gate weights are applied by the
    caller's combine step.
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

    def resolved_backend(self, x_ND: Tensor) -> str:
        if self.backend != "auto":
            return self.backend
        if x_ND.is_cuda and x_ND.dtype == torch.bfloat16:
            return "grouped_mm"
        return "loop"

    def forward(self, x_ND: Tensor, counts: list[int]) -> Tensor:
        if self.resolved_backend(x_ND) == "grouped_mm":
            return self._grouped_mm(x_ND, counts)
        return self._loop(x_ND, counts)

    def _loop(self, x_ND: Tensor, counts: list[int]) -> Tensor:
        w13, w2 = self.w13_EDF2.to(x_ND.dtype), self.w2_EFD.to(x_ND.dtype)
        outs: list[Tensor] = []
        start = 0
        for e, n in enumerate(counts):
            if n == 0:
                continue
            h = activate(x_ND[start : start + n] @ w13[e], self.activation)
            outs.append(h @ w2[e])
            start += n
        if not outs:  # no assignments at all (every ReLU output zero): keep the graph connected
            return x_ND.new_zeros(0, self.d_model) + 0.0 * (w13.sum() + w2.sum())
        return torch.cat(outs, dim=0) if len(outs) > 1 else outs[0]

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
