"""Auxiliary losses of routed layers: each paper formula in exactly one function.

All functions take a layer's own router outputs ``[T, E]`` and a boolean ``token_mask_T``
(True = real token); padding rows never count. Every loss is normalised by the number of valid
tokens of the call so that a model averages them over layers (the ``1/L`` factor) and a trainer
weights micro-batches by their share of the step's tokens, exactly as it does for the LM loss. All
arithmetic is at least float32 (inputs are upcast), whatever the autocast dtype.

The balance statistics (``f_e``) are those of the call: one micro-batch on one rank. Plain L1,
z-loss and the mean-probability side of the Switch loss are therefore exactly invariant to how a
step is split into micro-batches; the ``f``-weighted terms are invariant when the pieces share
their statistics (tests/layers/test_losses.py pins both).
"""

from __future__ import annotations

import torch
from torch import Tensor


def _upcast(t: Tensor) -> Tensor:
    """At least float32 (float64 stays float64 so reference tests can be tight)."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


def _valid(token_mask_T: Tensor | None, scores_TE: Tensor) -> Tensor:
    if token_mask_T is None:
        return torch.ones(scores_TE.shape[0], dtype=torch.bool, device=scores_TE.device)
    return token_mask_T


def switch_load_balance_loss(
    probs_TE: Tensor, tokens_per_expert_E: Tensor, token_mask_T: Tensor | None, top_k: int
) -> Tensor:
    """Switch Transformer load-balancing loss (Fedus et al. 2021, eq. 4), generalised to top-k.

    ``L = E · Σ_e f_e · P_e`` with ``f_e`` the fraction of the ``T·k`` routed slots that went to
    expert ``e`` (from ``tokens_per_expert_E``, before capacity dropping; no gradient) and ``P_e``
    the mean router probability of ``e`` over valid tokens. Normalised so that **1.0 means perfectly
    balanced** (uniform probabilities and uniform assignment); it grows to ``E`` when all tokens go
    to one expert with probability 1.
    """
    valid_T = _valid(token_mask_T, probs_TE)
    n_valid = valid_T.sum().clamp_min(1)
    num_experts = probs_TE.shape[-1]
    f_E = tokens_per_expert_E.detach() / (n_valid * top_k)
    p_E = (_upcast(probs_TE) * valid_T[:, None]).sum(0) / n_valid
    return num_experts * (f_E * p_E).sum()


def router_z_loss(logits_TE: Tensor, token_mask_T: Tensor | None) -> Tensor:
    """Router z-loss (Zoph et al. 2022, ST-MoE eq. 5): token mean of ``logsumexp(logits)²``."""
    valid_T = _valid(token_mask_T, logits_TE)
    n_valid = valid_T.sum().clamp_min(1)
    z_T = torch.logsumexp(_upcast(logits_TE), dim=-1)
    return (z_T.square() * valid_T).sum() / n_valid


def remoe_l1_loss(
    relu_TE: Tensor, token_mask_T: Tensor | None, top_k: int, balanced: bool = True
) -> Tensor:
    """ReMoE's load-balanced L1 penalty on router outputs (arXiv 2412.14711, eq. 7).

    For one layer: ``1/T · Σ_t Σ_e f_e · R_e(x_t)`` with
    ``f_e = E/(k·T) · Σ_t 1{R_e(x_t) > 0}`` treated as a constant (no gradient). Averaging over the
    L layers gives the paper's ``1/(L·T)`` normalisation. With ``balanced=False`` it is plain L1
    (``f_e = 1``). Rows with no active expert contribute 0 (no division by their count anywhere).
    """
    valid_T = _valid(token_mask_T, relu_TE)
    n_valid = valid_T.sum().clamp_min(1)
    r_TE = _upcast(relu_TE) * valid_T[:, None]
    if balanced:
        num_experts = relu_TE.shape[-1]
        active_E = (r_TE > 0).sum(0)
        f_E = (num_experts / (top_k * n_valid)) * active_E
        return (r_TE.sum(0) * f_E.detach()).sum() / n_valid
    return r_TE.sum() / n_valid


def sequence_load_balance_loss(
    probs_TE: Tensor, selected_TE: Tensor, token_mask_T: Tensor | None, top_k: int, seq_len: int
) -> Tensor:
    """Sequence-wise balance loss (DeepSeek-V2 §2.2.3; DeepSeek-V3 arXiv 2412.19437, eq. 17-20).

    The Switch formula ``E · Σ_e f_e · P_e`` computed inside each sequence of ``seq_len`` rows
    (``f_e = count_e / (k · T_s)`` from ``selected_TE``, the selected pairs, no gradient;
    ``P_e`` the mean of ``probs_TE`` over the sequence's valid tokens), then averaged over the
    sequences that have a valid token. 1.0 means every sequence is balanced on its own.
    """
    num_tokens, num_experts = probs_TE.shape
    valid_T = _valid(token_mask_T, probs_TE)
    valid_BL = valid_T.reshape(-1, seq_len)
    probs_BLE = _upcast(probs_TE).reshape(-1, seq_len, num_experts) * valid_BL[..., None]
    chosen_BLE = selected_TE.reshape(-1, seq_len, num_experts) & valid_BL[..., None]
    n_B = valid_BL.sum(1)
    f_BE = chosen_BLE.sum(1) / (n_B[:, None] * top_k).clamp_min(1)
    p_BE = probs_BLE.sum(1) / n_B[:, None].clamp_min(1)
    loss_B = num_experts * (f_BE.detach().to(p_BE.dtype) * p_BE).sum(-1)
    has_B = n_B > 0
    return (loss_B * has_B).sum() / has_B.sum().clamp_min(1)


def global_load_balance_loss(
    probs_TE: Tensor,
    global_tokens_per_expert_E: Tensor,
    global_valid_tokens: Tensor,
    token_mask_T: Tensor | None,
    top_k: int,
) -> Tensor:
    """Global-batch balance loss (Qiu et al. 2025, "Demons in the Detail", arXiv 2501.11873).

    ``E · Σ_e f_e · P_e`` with ``f_e = count_e / (k · T)`` over the *global* batch (the caller
    sums ``count_e`` and ``T`` over whatever it aggregates: data-parallel ranks; no gradient) and
    ``P_e`` the local mean router probability (the gradient path, as in the paper).
    """
    valid_T = _valid(token_mask_T, probs_TE)
    n_valid = valid_T.sum().clamp_min(1)
    num_experts = probs_TE.shape[-1]
    f_E = global_tokens_per_expert_E.detach() / (global_valid_tokens.clamp_min(1) * top_k)
    p_E = (_upcast(probs_TE) * valid_T[:, None]).sum(0) / n_valid
    return num_experts * (f_E.to(p_E.dtype) * p_E).sum()
