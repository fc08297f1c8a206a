"""Fitting compressed experts (``--method compressed_experts``) on calibration tokens.

What the routers do on the calibration tokens is recorded once (:func:`routed_tokens`: every
(token, expert) assignment's layer input and gate, through the layer's ``routing_observer``, in
eval mode on the unchanged model). An expert's importance is the gate mass it receives,
``Σ_t g_{t,e}`` (routing frequency × mean gate weight): the layer-level total of the paper's
per-token criterion, which keeps a token's highest-gated experts in full.

A replaced expert ``E_e(x) = act(x·W13)·W2`` becomes ``s_e(x) = b + act(x·W13_S)·W2'`` with ``S``
``r`` of its hidden units, chosen greedily by column-pivoted QR of the gated, output-scaled
activations ``g_t·a_j(x_t)·‖W2_j‖`` (after the constant column: each step keeps the unit whose
contribution the vector and the units already kept explain least, so a unit that copies kept
ones is never chosen), and ``(b, W2')`` the weighted least-squares fit of the expert's outputs
on the tokens routed to it, ``min Σ_t g_t²‖E_e(x_t) − s_e(x_t)‖²`` (what the layer output
loses, since it adds ``g_t·E_e``), with a tiny ridge towards the truncated expert
``(0, W2_S)`` so that an expert with fewer calibration tokens than unknowns stays well posed.
Closed form, not gradient descent: for fixed ``S`` the problem is linear in ``(b, W2')``, so
one solve gives the exact optimum, deterministically. ``r = 0`` leaves the vector ``b``, the
gated mean of the expert's outputs (the paper's compressed expert is such a vector, learnt
during fine-tuning there).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from moelab.compress.prune import calibration_forwards, moe_blocks
from moelab.layers.dense import activate, up_width
from moelab.model import TransformerLM

__all__ = [
    "RoutedTokens",
    "StandIn",
    "fit_stand_in",
    "pivoted_units",
    "routed_tokens",
    "stand_in_error",
]


@dataclass(frozen=True)
class RoutedTokens:
    """Every assignment of one MoE layer on the calibration tokens: its input row, expert, gate."""

    x_ND: Tensor
    expert_N: Tensor
    gate_N: Tensor

    def importance(self, num_experts: int) -> Tensor:
        """Gate mass per expert, ``Σ_t g_{t,e}`` (float64)."""
        mass = torch.zeros(num_experts, dtype=torch.float64)
        return mass.index_add(0, self.expert_N, self.gate_N.double())

    def rows(self, expert: int) -> tuple[Tensor, Tensor]:
        """Inputs and gates of the tokens routed to ``expert``."""
        mask = self.expert_N == expert
        return self.x_ND[mask], self.gate_N[mask]


@torch.no_grad()
def routed_tokens(model: TransformerLM, batches: list[Tensor]) -> dict[int, RoutedTokens]:
    """Per MoE block, the assignments its router makes on ``batches`` (eval mode, nothing
    learnt, the model unchanged)."""
    blocks = moe_blocks(model)
    parts: dict[int, list[tuple[Tensor, Tensor, Tensor]]] = {i: [] for i in blocks}

    def observer(block: int):
        def record(layer, decision, x_TD: Tensor) -> None:
            x_ND = x_TD.detach()[decision.token_idx_N].float().cpu()
            parts[block].append(
                (x_ND, decision.expert_idx_N.cpu(), decision.weight_N.detach().float().cpu())
            )

        return record

    calibration_forwards(model, batches, observers={i: observer(i) for i in blocks})
    empty = (torch.zeros(0), torch.zeros(0, dtype=torch.long), torch.zeros(0))
    return {
        i: RoutedTokens(*(torch.cat(list(t)) for t in zip(*p, strict=True)))
        if p
        else RoutedTokens(empty[0].view(0, blocks[i].d_model), *empty[1:])
        for i, p in parts.items()
    }


@dataclass(frozen=True)
class StandIn:
    """A compressed expert: ``b_D + act(x·w13)·w2`` (``w13: [D, up(r)]``, ``w2: [r, D]``)."""

    w13: Tensor
    w2: Tensor
    bias_D: Tensor
    units: list[int]  # the full expert's hidden units it keeps

    def __call__(self, x_nD: Tensor, activation: str) -> Tensor:
        out = self.bias_D.to(x_nD.dtype).expand(x_nD.shape[0], -1)
        if self.w2.shape[0]:
            out = out + activate(x_nD @ self.w13.to(x_nD.dtype), activation) @ self.w2.to(
                x_nD.dtype
            )
        return out


def _unit_columns(units: Tensor, hidden: int, activation: str) -> Tensor:
    """Columns of a fused ``w13`` that hidden units ``units`` read (SwiGLU: gate and up half)."""
    if up_width(hidden, activation) == 2 * hidden:
        return torch.cat([units, units + hidden])
    return units


def pivoted_units(m_nF: Tensor, const_n: Tensor, width: int) -> Tensor:
    """``width`` columns of ``m_nF`` chosen by column-pivoted QR (Businger-Golub) after
    projecting out ``const_n``: each step the column of largest residual norm (ties: the lower
    index), ascending. Once the residual vanishes, the remaining picks go by original norm."""
    m = m_nF.clone()
    norm0 = m.norm(dim=0)
    for q in (const_n,):
        if float(q.norm()) > 0:
            q = q / q.norm()
            m -= q[:, None] * (q @ m)[None, :]
    chosen: list[int] = []
    tiny = 1e-12 * max(float(norm0.max()) if norm0.numel() else 0.0, 1e-300)
    for _ in range(width):
        residual = m.norm(dim=0)
        residual[chosen] = -1.0
        j = int(torch.argmax(residual))  # first maximum: the lower index on ties
        if float(residual[j]) <= tiny:
            rest = [u for u in torch.argsort(-norm0, stable=True).tolist() if u not in chosen]
            chosen += rest[: width - len(chosen)]
            break
        chosen.append(j)
        q = m[:, j] / residual[j]
        m -= q[:, None] * (q @ m)[None, :]
    return torch.tensor(sorted(chosen), dtype=torch.long)


@torch.no_grad()
def fit_stand_in(
    w13: Tensor,
    w2: Tensor,
    activation: str,
    x_nD: Tensor,
    gate_n: Tensor,
    width: int,
    ridge: float = 1e-9,
) -> StandIn:
    """The compressed expert of width ``width`` fitted to the full expert ``(w13 [D, up(F)],
    w2 [F, D])`` on its routed tokens ``x_nD`` with gates ``gate_n`` (module docstring). With no
    tokens: the ``width`` units of largest ``‖W13_j‖·‖W2_j‖``, unchanged, and a zero vector."""
    hidden, dtype = w2.shape[0], w2.dtype
    w13d, w2d = w13.double(), w2.double()
    g = gate_n.double()
    out_norm = w2d.norm(dim=1)
    if x_nD.shape[0]:
        a_nF = activate(x_nD.double() @ w13d, activation)
        units = pivoted_units(g[:, None] * a_nF * out_norm, g, width)
    else:
        a_nF = None
        in_norm = w13d[:, _unit_columns(torch.arange(hidden), hidden, activation)].norm(dim=0)
        score = out_norm * in_norm.view(-1, hidden).norm(dim=0)
        units = torch.argsort(-score, stable=True)[:width].sort().values
    w13_S = w13d[:, _unit_columns(units, hidden, activation)]
    theta0 = torch.cat([torch.zeros(1, w2.shape[1], dtype=torch.float64), w2d[units]])
    if a_nF is None:
        theta = theta0
    else:
        phi = torch.cat([torch.ones(a_nF.shape[0], 1, dtype=torch.float64), a_nF[:, units]], 1)
        phi_w, y_w = g[:, None] * phi, g[:, None] * (a_nF @ w2d)
        gram = phi_w.T @ phi_w
        lam = ridge * (float(gram.diagonal().mean()) + 1e-30)
        eye = torch.eye(gram.shape[0], dtype=torch.float64)
        theta = torch.linalg.solve(gram + lam * eye, phi_w.T @ y_w + lam * theta0)
    return StandIn(w13_S.to(dtype), theta[1:].to(dtype), theta[0].to(dtype), units.tolist())


@torch.no_grad()
def stand_in_error(
    w13: Tensor, w2: Tensor, activation: str, x_nD: Tensor, gate_n: Tensor, stand_in: StandIn | None
) -> float:
    """``Σ_t g_t²‖E(x_t) − s(x_t)‖²``: what the layer output loses on these tokens when the
    expert is replaced by ``stand_in`` (None: dropped, ``s = 0``)."""
    x = x_nD.double()
    y = activate(x @ w13.double(), activation) @ w2.double()
    if stand_in is not None:
        s = stand_in
        y = y - StandIn(s.w13.double(), s.w2.double(), s.bias_D.double(), s.units)(x, activation)
    return float((gate_n.double()[:, None] ** 2 * y**2).sum())
