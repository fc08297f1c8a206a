"""Routers: map tokens to a :class:`RoutingDecision` (flat token/expert/weight assignments).

A router owns everything that follows from its own outputs:

* ``forward(x_TD, valid_T) -> RouterOutput``: the decision plus the dense router tensors;
* :meth:`Router.aux_losses`: its auxiliary losses, computed from that output and the token mask,
  and :meth:`Router.aux_coefficients`, their fixed coefficients;
* ``controlled_loss``: the name of the one loss (if any) whose coefficient is adapted between
  steps by :class:`~moelab.layers.SparsityController` (ReMoE's L1), and ``sparsity_target``, what
  that controller drives towards.

Logits are computed in float32 whatever the input dtype: a bf16 router flips near-tied top-k
choices and under-resolves small ReLU outputs. Adding a router from the literature is one
:class:`Router` subclass decorated with :func:`register_router` (and its tests); :class:`~moelab.
layers.MoE`, every dispatcher and expert backend, the configs (``model.ffn.router=NAME``) and the
trainer work with it unchanged. A router's keyword-only constructor arguments are its options.
"""

from __future__ import annotations

import difflib
import inspect
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moelab.layers.base import RoutingDecision
from moelab.layers.losses import remoe_l1_loss, router_z_loss, switch_load_balance_loss


@dataclass(frozen=True)
class RouterOutput:
    """A decision plus the dense router tensors the layer's losses and statistics need."""

    decision: RoutingDecision
    logits_TE: Tensor  # float32 pre-activation router outputs
    scores_TE: Tensor  # softmax probabilities (TopK) or ReLU outputs (ReMoE), float32
    nonzero: Tensor  # selected / positive (token, expert) pairs over valid tokens, before dropping


def make_decision(
    token_idx_N: Tensor, expert_idx_N: Tensor, weight_N: Tensor, num_tokens: int, num_experts: int
) -> RoutingDecision:
    """A decision from flat assignments, with its per-expert histogram."""
    counts_E = torch.bincount(expert_idx_N, minlength=num_experts)
    return RoutingDecision(
        token_idx_N=token_idx_N,
        expert_idx_N=expert_idx_N,
        weight_N=weight_N,
        tokens_per_expert_E=counts_E,
        num_tokens=num_tokens,
        num_experts=num_experts,
    )


def _check_coef(name: str, value: object) -> None:
    if (
        not isinstance(value, int | float)
        or isinstance(value, bool)
        or not value >= 0
        or value == float("inf")
    ):
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")


class Router(nn.Module):
    """Base of every router: a bias-free ``[E, D]`` gate (``nn.Linear(D, E)`` layout, the one
    ``transformers`` uses for Mixtral's ``gate``) applied in float32, and the router z-loss.

    Subclasses set ``name`` (the registry key), ``method`` (how runs and reports name the
    method) and implement :meth:`forward`; they extend :meth:`aux_losses` /
    :meth:`aux_coefficients` with their own terms.

    Args:
        d_model: D.
        num_experts: E routed experts.
        top_k: k, experts per token (for ReLU routing: the k of the sparsity target ``1 − k/E``).
        init_std: normal init std of the gate.
        z_loss_coef: router z-loss coefficient (ST-MoE); 0 disables it.
    """

    name: ClassVar[str] = ""
    method: ClassVar[str] = ""
    controlled_loss: ClassVar[str | None] = None

    def __init__(
        self,
        d_model: int,
        num_experts: int,
        top_k: int,
        *,
        init_std: float = 0.02,
        z_loss_coef: float = 0.0,
    ) -> None:
        super().__init__()
        if top_k > num_experts:
            raise ValueError(f"top_k must be <= num_experts ({num_experts}), got {top_k}")
        _check_coef("z_loss_coef", z_loss_coef)
        self.num_experts = num_experts
        self.top_k = top_k
        self.z_loss_coef = float(z_loss_coef)
        self.weight = nn.Parameter(torch.empty(num_experts, d_model))
        nn.init.normal_(self.weight, std=init_std)

    def logits(self, x_TD: Tensor) -> Tensor:
        """Router logits in at least float32 (float64 stays float64, for reference tests)."""
        dtype = torch.promote_types(x_TD.dtype, torch.float32)
        with torch.autocast(device_type=x_TD.device.type, enabled=False):
            return F.linear(x_TD.to(dtype), self.weight.to(dtype))

    def forward(self, x_TD: Tensor, valid_T: Tensor | None) -> RouterOutput:
        raise NotImplementedError

    def aux_losses(self, out: RouterOutput, valid_T: Tensor | None) -> dict[str, Tensor]:
        """Unweighted aux losses of one forward, each normalised by its valid tokens."""
        if self.z_loss_coef > 0:
            return {"z_loss": router_z_loss(out.logits_TE, valid_T)}
        return {}

    def aux_coefficients(self) -> dict[str, float]:
        """Fixed coefficient of each aux loss (the controlled loss has none here)."""
        return {"z_loss": self.z_loss_coef} if self.z_loss_coef > 0 else {}

    @property
    def sparsity_target(self) -> float | None:
        """Fraction of zero router outputs the λ controller drives towards (None: no controller)."""
        return None


ROUTERS: dict[str, type[Router]] = {}


def register_router(cls: type[Router]) -> type[Router]:
    """Class decorator: make ``cls`` available as ``MoE(router=cls.name)`` and in configs."""
    if not cls.name or cls.name in ROUTERS:
        raise ValueError(f"router name {cls.name!r} is empty or already registered")
    ROUTERS[cls.name] = cls
    return cls


def router_class(name: str) -> type[Router]:
    """The registered router called ``name``; the error lists the registered ones."""
    if name not in ROUTERS:
        close = difflib.get_close_matches(str(name), ROUTERS, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        choices = ", ".join(repr(n) for n in ROUTERS)
        raise ValueError(f"router must be one of {choices}, got {name!r}{hint}")
    return ROUTERS[name]


def router_options(name: str) -> dict[str, Any]:
    """Options of router ``name``: its keyword-only constructor arguments and their defaults
    (``init_std`` excluded: it comes from the model)."""
    params = inspect.signature(router_class(name)).parameters.values()
    return {
        p.name: p.default
        for p in params
        if p.kind is inspect.Parameter.KEYWORD_ONLY and p.name != "init_std"
    }


def build_router(
    name: str, d_model: int, num_experts: int, top_k: int, init_std: float, **options: Any
) -> Router:
    """Construct router ``name``; an option it does not take is an error naming its options."""
    allowed = router_options(name)
    for key in options:
        if key not in allowed:
            close = difflib.get_close_matches(key, allowed, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ValueError(
                f"router {name!r} has no option {key!r}{hint}; its options: {', '.join(allowed)}"
            )
    return router_class(name)(d_model, num_experts, top_k, init_std=init_std, **options)


@register_router
class TopKRouter(Router):
    """Token-choice top-k with softmax (Shazeer et al. 2017; Switch; Mixtral), with the Switch
    load-balancing loss (Fedus et al. 2021, eq. 4) weighted by ``balance_coef``.

    ``softmax_after_topk=False`` (default, as ReMoE's baseline): weights are the softmax over all E
    logits, taken at the top-k; ``renormalize=True`` rescales those k weights to sum to 1 (Mixtral).
    ``softmax_after_topk=True``: softmax over the k selected logits only.
    """

    name = "topk"
    method = "topk"

    def __init__(
        self,
        d_model: int,
        num_experts: int,
        top_k: int,
        *,
        renormalize: bool = False,
        softmax_after_topk: bool = False,
        balance_coef: float = 0.01,
        z_loss_coef: float = 0.0,
        init_std: float = 0.02,
    ) -> None:
        if softmax_after_topk and top_k == 1:
            raise ValueError(
                "softmax_after_topk needs top_k > 1: a softmax over one selected logit is "
                "always 1, so the router would get no gradient"
            )
        super().__init__(d_model, num_experts, top_k, init_std=init_std, z_loss_coef=z_loss_coef)
        _check_coef("balance_coef", balance_coef)
        self.renormalize = renormalize
        self.softmax_after_topk = softmax_after_topk
        self.balance_coef = float(balance_coef)

    def forward(self, x_TD: Tensor, valid_T: Tensor | None) -> RouterOutput:
        logits_TE = self.logits(x_TD)
        probs_TE = logits_TE.softmax(dim=-1)
        top_logits_TK, top_idx_TK = logits_TE.topk(self.top_k, dim=-1)
        if self.softmax_after_topk:
            weight_TK = top_logits_TK.softmax(dim=-1)
        else:
            weight_TK = probs_TE.gather(1, top_idx_TK)
            if self.renormalize:
                weight_TK = weight_TK / weight_TK.sum(-1, keepdim=True)
        num_tokens = x_TD.shape[0]
        token_idx_TK = torch.arange(num_tokens, device=x_TD.device)[:, None].expand_as(top_idx_TK)
        token_idx_N, expert_idx_N, weight_N = (
            token_idx_TK.reshape(-1),
            top_idx_TK.reshape(-1),
            weight_TK.reshape(-1),
        )
        if valid_T is not None:
            keep_N = valid_T[token_idx_N]
            token_idx_N, expert_idx_N, weight_N = (
                token_idx_N[keep_N],
                expert_idx_N[keep_N],
                weight_N[keep_N],
            )
        decision = make_decision(token_idx_N, expert_idx_N, weight_N, num_tokens, self.num_experts)
        nonzero = torch.tensor(token_idx_N.numel(), device=x_TD.device)
        return RouterOutput(decision, logits_TE, probs_TE, nonzero)

    def aux_losses(self, out: RouterOutput, valid_T: Tensor | None) -> dict[str, Tensor]:
        losses: dict[str, Tensor] = {}
        if self.balance_coef > 0:
            losses["load_balance"] = switch_load_balance_loss(
                out.scores_TE, out.decision.tokens_per_expert_E, valid_T, self.top_k
            )
        return losses | super().aux_losses(out, valid_T)

    def aux_coefficients(self) -> dict[str, float]:
        own = {"load_balance": self.balance_coef} if self.balance_coef > 0 else {}
        return own | super().aux_coefficients()


@register_router
class ReLURouter(Router):
    """ReMoE's router (arXiv 2412.14711, eq. 5): ``R(x) = ReLU(x W)``; no softmax, no top-k.

    Every positive output is an assignment whose weight is that output, so each token gets a
    variable number of experts (possibly none: it then keeps only the residual path). Its L1
    penalty (eq. 7, load-balanced unless ``l1_balanced=False``) is the controlled loss: its
    coefficient λ is adapted each step towards ``sparsity_target = 1 − k/E`` (eq. 8) by
    :class:`~moelab.layers.SparsityController`.
    """

    name = "relu"
    method = "remoe"
    controlled_loss = "remoe_l1"

    def __init__(
        self,
        d_model: int,
        num_experts: int,
        top_k: int,
        *,
        l1_balanced: bool = True,
        z_loss_coef: float = 0.0,
        init_std: float = 0.02,
    ) -> None:
        if top_k >= num_experts:
            raise ValueError(
                f"top_k must be < num_experts for router 'relu' (target sparsity 1 - k/E > 0), "
                f"got top_k={top_k}, num_experts={num_experts}"
            )
        super().__init__(d_model, num_experts, top_k, init_std=init_std, z_loss_coef=z_loss_coef)
        self.l1_balanced = l1_balanced

    def forward(self, x_TD: Tensor, valid_T: Tensor | None) -> RouterOutput:
        logits_TE = self.logits(x_TD)
        relu_TE = F.relu(logits_TE)
        active_TE = relu_TE > 0
        if valid_T is not None:
            active_TE = active_TE & valid_T[:, None]
        token_idx_N, expert_idx_N = active_TE.nonzero(as_tuple=True)
        weight_N = relu_TE[token_idx_N, expert_idx_N]
        decision = make_decision(
            token_idx_N, expert_idx_N, weight_N, x_TD.shape[0], self.num_experts
        )
        nonzero = torch.tensor(token_idx_N.numel(), device=x_TD.device)
        return RouterOutput(decision, logits_TE, relu_TE, nonzero)

    def aux_losses(self, out: RouterOutput, valid_T: Tensor | None) -> dict[str, Tensor]:
        l1 = remoe_l1_loss(out.scores_TE, valid_T, self.top_k, self.l1_balanced)
        return {self.controlled_loss: l1} | super().aux_losses(out, valid_T)

    @property
    def sparsity_target(self) -> float:
        return 1.0 - self.top_k / self.num_experts


def uniform_assignment(
    num_tokens: int, num_experts: int, top_k: int, valid_T: Tensor | None, device: torch.device
) -> tuple[Tensor, Tensor]:
    """Debug routing: token t goes to experts ``(t·k + j) mod E`` - perfectly balanced, so speed can
    be measured apart from routing quality. Returns ``(token_idx_N, expert_idx_N)``."""
    token_idx_N = torch.arange(num_tokens, device=device).repeat_interleave(top_k)
    expert_idx_N = torch.arange(num_tokens * top_k, device=device) % num_experts
    if valid_T is not None:
        keep_N = valid_T[token_idx_N]
        token_idx_N, expert_idx_N = token_idx_N[keep_N], expert_idx_N[keep_N]
    return token_idx_N, expert_idx_N
