"""MoE++ (Jin et al. 2024, arXiv 2410.07348): zero-computation experts next to the FFN experts,
and gating residuals that feed each layer's router the previous layer's logits."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from moelab.layers.base import RoutingContext
from moelab.layers.routers.base import (
    LossFn,
    Router,
    RouterOutput,
    check_coef,
    decision_from_choices,
    register_router,
)

# The key under which a layer hands its router logits to the next MoE++ layer.
RESIDUAL_KEY = "moepp_logits"


def heterogeneous_balance_loss(
    probs_TN: Tensor, chosen_TK: Tensor, valid_T: Tensor | None, eta_N: Tensor
) -> Tensor:
    """MoE++'s heterogeneous load-balance loss (arXiv 2410.07348, §3.3):
    ``L = N · Σ_i η_i · f_i · P_i`` over all N experts (FFN and zero-computation), ``f_i`` the
    fraction of the ``T·k`` routed slots that chose i (no gradient), ``P_i`` the mean router
    probability of i over valid tokens, ``η_i = 1`` for FFN experts and ``τ`` for the
    zero-computation ones. With every ``η = 1`` it is the Switch loss over all N (1.0 = balanced).
    """
    num_tokens, N = probs_TN.shape
    if valid_T is None:
        valid_T = torch.ones(num_tokens, dtype=torch.bool, device=probs_TN.device)
    n_valid = valid_T.sum().clamp_min(1)
    k = chosen_TK.shape[-1]
    counts_N = torch.bincount(chosen_TK[valid_T].reshape(-1), minlength=N)
    f_N = counts_N.to(probs_TN.dtype) / (n_valid * k)
    p_N = (probs_TN * valid_T[:, None]).sum(0) / n_valid
    return N * (eta_N * f_N * p_N).sum()


def _check_count(name: str, value: object) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ValueError(f"{name} must be an integer >= 0, got {value!r}")


@register_router
class MoEPPRouter(Router):
    """MoE++ (Jin, Zhu, Yuan, Yan 2024, arXiv 2410.07348, §3): one softmax top-k over the E FFN
    experts and ``zero_experts`` + ``copy_experts`` + ``constant_experts`` zero-computation
    experts, ``y = Σ_{i ∈ top-k} g_i · E_i(x)`` with ``g = softmax(G(x))`` (eq. 5):

    * zero expert (eq. 2): ``E(x) = 0`` - the token skips the FFN;
    * copy expert (eq. 3): ``E(x) = x``;
    * constant expert (eq. 4): ``E(x) = α₁·x + α₂·v``, ``[α₁, α₂] = softmax(W_c·x)`` with a learnt
      ``W_c ∈ R^{2×D}`` and vector ``v ∈ R^D`` per constant expert.

    Gating residuals (eq. 6): ``G(x^j) = W^j·x^j + W_g^j·G(x^{j-1})``, the previous MoE++ layer's
    logits (passed on through :class:`~moelab.layers.base.RoutingContext`, with their graph)
    through a learnt ``[N, N]`` map; the first layer has none (it touches ``W_g`` with weight 0 so
    that every parameter gets a gradient, as DDP requires).

    The FFN experts' picks form the decision; the zero-computation experts' weighted outputs are
    ``RouterOutput.direct_TD``, added by the MoE block. A token thus runs between 0 and k FFN
    experts: ``last_stats.active_mean`` is the FFN experts per token (k minus what MoE++ saves).
    ``num_experts`` of the MoE counts the FFN experts only.

    Balance: the heterogeneous load-balance loss (§3.3, :func:`heterogeneous_balance_loss`)
    weighted by ``balance_coef``, with ``η = balance_tau`` for zero-computation experts.
    """

    name = "moepp"
    method = "moepp"
    prunable = True  # the zero-computation experts are all kept; not exact (softmax over all)
    upcyclable = True
    convertible = True

    def __init__(
        self,
        d_model: int,
        num_experts: int,
        top_k: int,
        *,
        zero_experts: int = 1,
        copy_experts: int = 1,
        constant_experts: int = 2,
        balance_coef: float = 0.01,
        balance_tau: float = 0.75,
        gating_residual: bool = True,
        z_loss_coef: float = 0.0,
        jitter_eps: float = 0.0,
        init_std: float = 0.02,
    ) -> None:
        for name, value in (
            ("zero_experts", zero_experts),
            ("copy_experts", copy_experts),
            ("constant_experts", constant_experts),
        ):
            _check_count(name, value)
        balance_coef = check_coef("balance_coef", balance_coef)
        balance_tau = check_coef("balance_tau", balance_tau)
        if not isinstance(gating_residual, bool):
            raise ValueError(f"gating_residual must be true or false, got {gating_residual!r}")
        num_all = num_experts + zero_experts + copy_experts + constant_experts
        if top_k > num_all:
            raise ValueError(
                f"top_k must be <= num_experts + zero/copy/constant experts ({num_all}), "
                f"got {top_k}"
            )
        super().__init__(
            d_model,
            num_all,
            top_k,
            init_std=init_std,
            z_loss_coef=z_loss_coef,
            jitter_eps=jitter_eps,
        )
        self.num_experts = num_experts  # FFN experts: what the decision indexes
        self.num_all = num_all
        self.zero_experts, self.copy_experts = zero_experts, copy_experts
        self.constant_experts = constant_experts
        self.balance_coef, self.balance_tau = balance_coef, balance_tau
        self.gating_residual = gating_residual
        self.const_gate_C2D: nn.Parameter | None = None
        self.const_vec_CD: nn.Parameter | None = None
        if constant_experts:
            self.const_gate_C2D = nn.Parameter(torch.empty(constant_experts, 2, d_model))
            self.const_vec_CD = nn.Parameter(torch.empty(constant_experts, d_model))
            nn.init.normal_(self.const_gate_C2D, std=init_std)
            nn.init.normal_(self.const_vec_CD, std=1.0)  # v is an output: the scale of x
        self.residual_NN: nn.Parameter | None = None
        if gating_residual:
            self.residual_NN = nn.Parameter(torch.empty(num_all, num_all))
            nn.init.normal_(self.residual_NN, std=init_std)
        eta_N = torch.full((num_all,), float(balance_tau))
        eta_N[:num_experts] = 1.0
        self.register_buffer("eta_N", eta_N, persistent=False)

    def gate_rows(self, experts_K: Tensor) -> Tensor:
        """The FFN experts' rows, then every zero-computation expert's."""
        others = torch.arange(self.num_experts, self.num_all, device=experts_K.device)
        return torch.cat([experts_K, others])

    def pruned_state(self, kept_K: Tensor) -> dict[str, Tensor]:
        """Gate rows and the gating residual's rows and columns of the kept experts."""
        state = super().pruned_state(kept_K)
        if "residual_NN" in state:
            rows = self.gate_rows(kept_K.cpu()).to(state["residual_NN"].device)
            state["residual_NN"] = state["residual_NN"][rows][:, rows]
        return state

    def gate_logits(self, x_TD: Tensor, context: RoutingContext | None) -> Tensor:
        """``W·x`` plus the gating residual ``W_g · G(x^{j-1})``; passes the result on."""
        logits_TN = self.logits(x_TD)
        if self.residual_NN is None:
            return logits_TN
        prev_TN = None if context is None else context.get(RESIDUAL_KEY)
        w_NN = self.residual_NN.to(logits_TN.dtype)
        if prev_TN is None:
            logits_TN = logits_TN + 0.0 * w_NN.sum()  # first layer: W_g unused, gradient 0
        else:
            if prev_TN.shape != logits_TN.shape:
                raise ValueError(
                    f"the previous MoE++ layer passed logits of shape {tuple(prev_TN.shape)}, "
                    f"this layer has {tuple(logits_TN.shape)}: gating residuals need the same "
                    "experts (FFN + zero-computation) in every MoE++ layer"
                )
            logits_TN = logits_TN + prev_TN.to(logits_TN.dtype) @ w_NN.T
        if context is not None:
            context.pass_on(RESIDUAL_KEY, logits_TN)
        return logits_TN

    def forward(
        self, x_TD: Tensor, valid_T: Tensor | None, context: RoutingContext | None = None
    ) -> RouterOutput:
        logits_TN = self.gate_logits(x_TD, context)
        probs_TN = logits_TN.softmax(dim=-1)
        top_w_TK, top_idx_TK = probs_TN.topk(self.top_k, dim=-1)
        ffn_TK = top_idx_TK < self.num_experts  # FFN experts go to the dispatcher
        decision, nonzero = decision_from_choices(
            top_idx_TK, top_w_TK, valid_T, self.num_experts, keep_TK=ffn_TK
        )
        gate_TN = torch.zeros_like(probs_TN).scatter(1, top_idx_TK, top_w_TK)
        if valid_T is not None:
            gate_TN = gate_TN * valid_T[:, None]
        direct_TD = self.zero_computation_output(x_TD, gate_TN)
        return RouterOutput(decision, logits_TN, probs_TN, nonzero, direct_TD)

    def zero_computation_output(self, x_TD: Tensor, gate_TN: Tensor) -> Tensor:
        """``Σ g_i · E_i(x)`` over the chosen copy and constant experts (zero experts add 0)."""
        x_TD = x_TD.to(gate_TN.dtype)
        first_copy = self.num_experts + self.zero_experts
        first_const = first_copy + self.copy_experts
        copy_T = gate_TN[:, first_copy:first_const].sum(-1)
        out_TD = copy_T[:, None] * x_TD
        if self.const_gate_C2D is not None:
            gate_TC = gate_TN[:, first_const:]
            w_C2D = self.const_gate_C2D.to(x_TD.dtype)
            alpha_TC2 = torch.einsum("td,cad->tca", x_TD, w_C2D).softmax(dim=-1)
            keep_T = (gate_TC * alpha_TC2[..., 0]).sum(-1)  # Σ_c g_c·α₁,c
            mix_TC = gate_TC * alpha_TC2[..., 1]  # g_c·α₂,c
            out_TD = out_TD + keep_T[:, None] * x_TD + mix_TC @ self.const_vec_CD.to(x_TD.dtype)
        return out_TD

    def fixed_losses(self) -> dict[str, tuple[float, LossFn]]:
        return {"load_balance": (self.balance_coef, self._balance_loss)} | super().fixed_losses()

    def _balance_loss(self, out: RouterOutput, valid_T: Tensor | None) -> Tensor:
        chosen_TK = out.scores_TE.detach().topk(self.top_k, dim=-1).indices
        eta_N = self.eta_N.to(out.scores_TE.dtype)
        return heterogeneous_balance_loss(out.scores_TE, chosen_TK, valid_T, eta_N)
