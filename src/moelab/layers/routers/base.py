"""Routers: map tokens to a :class:`RoutingDecision` (flat token/expert/weight assignments).

A router owns everything that follows from its own outputs:

* ``forward(x_TD, valid_T, context) -> RouterOutput``: the decision plus the dense router tensors
  (``context``, a :class:`~moelab.layers.base.RoutingContext`, brings token ids and state passed
  from the previous routed layer to the routers that use them);
* :meth:`Router.aux_losses`: its auxiliary losses, computed from that output and the token mask,
  and :meth:`Router.aux_coefficients`, their fixed coefficients - both read from one table,
  :meth:`Router.fixed_losses` (name → coefficient and loss), which is what a router extends;
* ``controlled_loss``: the name of the one loss (if any) whose coefficient is adapted between
  steps by :class:`~moelab.layers.SparsityController` (ReMoE's L1), and ``sparsity_target``, what
  that controller drives towards;
* :meth:`Router.step_update`: state kept between optimizer steps (e.g. aux-loss-free balancing's
  per-expert bias), updated from the step's expert loads by
  :class:`~moelab.layers.RouterLoadHook` - the same kind of between-step hook as the λ controller,
  never inside ``forward``. Such state is a buffer, so checkpoints carry it.

What a router supports beyond training is declared on its class, next to the between-step flags
(``updates_between_steps``, ``sets_own_capacity``): one boolean per capability of
:data:`CAPABILITIES` (``causal_at_inference``, ``exportable``, ``prunable``, ``upcyclable``,
``convertible``, ``mergeable``), the reason for each one it lacks in ``lacks``, and the methods
those capabilities need (:meth:`Router.pruned_state`, :meth:`Router.upcycle_init`,
:meth:`Router.load_gate`, ...). Export, convert, upcycle, prune, the CLI and the benches ask
the registry (:mod:`~moelab.layers.routers.registry`: ``routers_with``, ``require``) and never list
router names; a router one of them cannot take is refused with :meth:`Router.refusal`'s one line.

Logits are computed in float32 whatever the input dtype: a bf16 router flips near-tied top-k
choices and under-resolves small ReLU outputs. Adding a router from the literature is one
:class:`Router` subclass decorated with :func:`register_router` (and its tests); :class:`~moelab.
layers.MoE`, every dispatcher and expert backend, the configs (``model.ffn.router=NAME``) and the
trainer work with it unchanged. A router's keyword-only constructor arguments are its options.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moelab.layers.base import RoutingContext, RoutingDecision
from moelab.layers.losses import router_z_loss, switch_load_balance_loss


@dataclass(frozen=True)
class RouterOutput:
    """A decision plus the dense router tensors the layer's losses and statistics need."""

    decision: RoutingDecision
    logits_TE: Tensor  # float32 pre-activation router outputs
    scores_TE: Tensor  # softmax probabilities (TopK) or ReLU outputs (ReMoE), float32
    nonzero: Tensor  # selected / positive (token, expert) pairs over valid tokens, before dropping
    # Output the router computes itself, added to the experts' combined output: zero-computation
    # experts (MoE++'s copy / constant experts) whose cost is an elementwise op, not a matmul.
    direct_TD: Tensor | None = None


LossFn = Callable[[RouterOutput, Tensor | None], Tensor]
"""An aux loss of one forward: ``loss(out, valid_T)``, unweighted, normalised by valid tokens."""


def switch_balance_loss(out: RouterOutput, valid_T: Tensor | None, top_k: int) -> Tensor:
    """The Switch balance loss (Fedus et al. 2021, eq. 4) of a router output: ``f_e`` from the
    decision's per-expert counts over ``top_k`` slots per token, ``P_e`` from ``out.scores_TE``
    (the routing probabilities)."""
    return switch_load_balance_loss(out.scores_TE, out.decision.tokens_per_expert_E, valid_T, top_k)


def _z_loss(out: RouterOutput, valid_T: Tensor | None) -> Tensor:
    return router_z_loss(out.logits_TE, valid_T)


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


def decision_from_choices(
    expert_idx_TK: Tensor,
    weight_TK: Tensor,
    valid_T: Tensor | None,
    num_experts: int,
    keep_TK: Tensor | None = None,
) -> tuple[RoutingDecision, Tensor]:
    """The decision of routers where each token chose K experts (``[T, K]`` ids and gates), and
    its assignment count (a router's ``nonzero``). Padding tokens' choices are left out, and so are
    those ``keep_TK`` marks False (choices that are not routed experts: null or zero-computation
    experts). Assignments stay in token-major order."""
    num_tokens = expert_idx_TK.shape[0]
    token_idx_TK = torch.arange(num_tokens, device=expert_idx_TK.device)[:, None]
    token_idx_TK = token_idx_TK.expand_as(expert_idx_TK)
    if valid_T is not None:
        valid_TK = valid_T[:, None].expand_as(expert_idx_TK)
        keep_TK = valid_TK if keep_TK is None else keep_TK & valid_TK
    if keep_TK is None:
        flat = token_idx_TK.reshape(-1), expert_idx_TK.reshape(-1), weight_TK.reshape(-1)
    else:
        flat = token_idx_TK[keep_TK], expert_idx_TK[keep_TK], weight_TK[keep_TK]
    decision = make_decision(*flat, num_tokens, num_experts)
    return decision, torch.tensor(flat[0].numel(), device=expert_idx_TK.device)


def check_coef(name: str, value: object) -> float:
    """``value`` as a float once it is a finite number >= 0 (a loss coefficient, a rate), else a
    ValueError naming ``name``."""
    if (
        not isinstance(value, int | float)
        or isinstance(value, bool)
        or not value >= 0
        or value == float("inf")
    ):
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    return float(value)


# Each capability a router may declare (a ClassVar[bool] of that name on its class), with how its
# refusal reads. A door that needs one asks the registry (routers_with, require).
CAPABILITIES: dict[str, str] = {
    "causal_at_inference": "is not causal at inference (a token's output may depend on later "
    "tokens)",
    "exportable": "cannot be exported to transformers (moelab export-hf)",
    "prunable": "cannot be pruned (moelab prune)",
    "upcyclable": "cannot be upcycled from a dense model (moelab upcycle)",
    "convertible": "cannot take over a converted checkpoint's TopK gate (moelab convert-hf "
    "--router)",
    "mergeable": "cannot have its experts merged",
    "routes_by_rank": "cannot route each token to its expert of one rank at inference "
    "(SCMoE's weak pass, moelab generate --decoding scmoe)",
}


def check_capability(capability: str) -> None:
    if capability not in CAPABILITIES:
        raise ValueError(
            f"capability must be one of {', '.join(map(repr, CAPABILITIES))}, got {capability!r}"
        )


class Router(nn.Module):
    """Base of every router: a bias-free ``[E, D]`` gate (``nn.Linear(D, E)`` layout, the one
    ``transformers`` uses for Mixtral's ``gate``) applied in float32, and the router z-loss.

    Subclasses set ``name`` (the registry key), ``method`` (how runs and reports name the
    method) and implement :meth:`forward`; they add their fixed-coefficient losses to
    :meth:`fixed_losses` (a loss without a fixed coefficient, the controlled one, by extending
    :meth:`aux_losses`).

    Args:
        d_model: D.
        num_experts: E routed experts.
        top_k: k, experts per token (for ReLU routing: the k of the sparsity target ``1 − k/E``).
        init_std: normal init std of the gate.
        z_loss_coef: router z-loss coefficient (ST-MoE); 0 disables it.
        jitter_eps: Switch Transformer's multiplicative router-input jitter (Fedus et al. 2021,
            arXiv 2101.03961; ST-MoE's "input jitter": ``x · U(1 − ε, 1 + ε)``), applied in
            :meth:`logits` in training mode only; 0 (default) disables it and draws no random
            numbers. Softmax routers expose it as an option by taking ``jitter_eps`` as a keyword
            and passing it here.
    """

    name: ClassVar[str] = ""
    method: ClassVar[str] = ""
    controlled_loss: ClassVar[str | None] = None
    # True when step_update() must be called once per optimizer step (RouterLoadHook does it).
    updates_between_steps: ClassVar[bool] = False
    # True when the router sets each expert's capacity itself (MoE refuses its capacity_factor).
    sets_own_capacity: ClassVar[bool] = False

    # Capabilities the doors outside training ask (they never name a router), one per key of
    # CAPABILITIES; ``lacks`` says why one is False (looked up along the MRO, so a subclass adds
    # its own reasons; export's reason is ``not_exportable_reason``). Options that withdraw a
    # capability: override ``refusal``.
    prunable: ClassVar[bool] = False  # needs pruned_state (and pruned_options) to be right
    upcyclable: ClassVar[bool] = False  # needs upcycle_init
    convertible: ClassVar[bool] = False  # needs load_gate
    mergeable: ClassVar[bool] = False
    # True when, with ``inference_rank = r`` set, an eval forward routes each token to its r-th
    # ranked expert alone (Self-Contrast MoE's weak routing); the router reads that attribute.
    routes_by_rank: ClassVar[bool] = False
    lacks: ClassVar[dict[str, str]] = {
        "mergeable": "its routing has not been checked with merged experts sharing weight slots",
        "routes_by_rank": "it does not select a fixed number of experts by score rank",
    }
    # Experts per token a small example of the method uses (tests, benches): 1, or the k the
    # method needs (a top-2 method, a gate normalised over its choices).
    example_top_k: ClassVar[int] = 1
    # Timed at every expert shape by ``moelab bench moe`` (the ReMoE paper's two methods; every
    # router is timed at the coarse shape by ``--configs routers``).
    bench_shapes: ClassVar[bool] = False
    # True when, in eval mode, a token's routing reads no later token, so KV-cache decoding
    # equals a full forward.
    causal_at_inference: ClassVar[bool] = True
    # True when ``moelab export-hf`` may write it: the generated modelling file carries this class
    # and the exported model decodes as moelab does. When False, ``not_exportable_reason`` says
    # why in one line (what follows "cannot be exported to transformers: ").
    exportable: ClassVar[bool] = True
    not_exportable_reason: ClassVar[str] = ""

    def __init__(
        self,
        d_model: int,
        num_experts: int,
        top_k: int,
        *,
        init_std: float = 0.02,
        z_loss_coef: float = 0.0,
        jitter_eps: float = 0.0,
    ) -> None:
        super().__init__()
        if top_k > num_experts:
            raise ValueError(f"top_k must be <= num_experts ({num_experts}), got {top_k}")
        self.z_loss_coef = check_coef("z_loss_coef", z_loss_coef)
        if isinstance(jitter_eps, bool) or not isinstance(jitter_eps, int | float):
            raise ValueError(f"jitter_eps must be a number in [0, 1), got {jitter_eps!r}")
        if not 0 <= jitter_eps < 1:
            raise ValueError(f"jitter_eps must be in [0, 1), got {jitter_eps!r}")
        self.jitter_eps = float(jitter_eps)
        self.num_experts = num_experts
        self.top_k = top_k
        # Inference-time routing changes, set from outside and never saved (not buffers):
        # ``logit_offset`` is added to the logits (test-time rerouting's additive vector, one
        # value per row of ``weight``); ``inference_rank`` is read by routers that declare
        # ``routes_by_rank``. Both None: the trained routing.
        self.logit_offset: Tensor | None = None
        self.inference_rank: int | None = None
        self.weight = nn.Parameter(torch.empty(num_experts, d_model))
        nn.init.normal_(self.weight, std=init_std)

    def logits(self, x_TD: Tensor) -> Tensor:
        """Router logits in at least float32 (float64 stays float64, for reference tests); the
        input is jittered first when training with ``jitter_eps > 0``; ``logit_offset``, when
        set, is added."""
        dtype = torch.promote_types(x_TD.dtype, torch.float32)
        with torch.autocast(device_type=x_TD.device.type, enabled=False):
            x = x_TD.to(dtype)
            if self.training and self.jitter_eps > 0:
                eps = self.jitter_eps
                x = x * torch.empty_like(x).uniform_(1.0 - eps, 1.0 + eps)
            logits = F.linear(x, self.weight.to(dtype))
            if self.logit_offset is not None:
                logits = logits + self.logit_offset.to(dtype)
            return logits

    def forward(
        self, x_TD: Tensor, valid_T: Tensor | None, context: RoutingContext | None = None
    ) -> RouterOutput:
        raise NotImplementedError

    def step_update(self, tokens_per_expert_E: Tensor) -> None:
        """Between-step update from the step's expert loads (summed over micro-batches and
        data-parallel ranks, padding excluded); only routers with ``updates_between_steps``."""
        raise NotImplementedError(f"router {self.name!r} keeps no state between steps")

    def model_shared_parameters(self) -> list[nn.Parameter]:
        """This router's parameters that a model holds once and every router of this kind uses
        (RMoE's GRU, shared over depth); none by default. Parameter accounting counts them once
        per model, not once per layer, as the built model's ``parameters()`` does."""
        return []

    def fixed_losses(self) -> dict[str, tuple[float, LossFn]]:
        """This router's aux losses with a fixed coefficient, in the order they are reported and
        summed: ``name → (coefficient, loss)``. A coefficient of 0 turns its loss off (neither
        computed nor reported). Subclasses put theirs before ``super().fixed_losses()`` (the
        z-loss here); :meth:`aux_losses` and :meth:`aux_coefficients` both read this one table,
        so no loss is reported without its coefficient, nor a coefficient without its loss."""
        return {"z_loss": (self.z_loss_coef, _z_loss)}

    def aux_losses(self, out: RouterOutput, valid_T: Tensor | None) -> dict[str, Tensor]:
        """Unweighted aux losses of one forward, each normalised by its valid tokens: those of
        :meth:`fixed_losses` that are on (a controlled loss is added by extending this)."""
        return {
            name: loss(out, valid_T)
            for name, (coef, loss) in self.fixed_losses().items()
            if coef > 0
        }

    def aux_coefficients(self) -> dict[str, float]:
        """Fixed coefficient of each aux loss that is on (the controlled loss has none here)."""
        return {name: coef for name, (coef, _) in self.fixed_losses().items() if coef > 0}

    @property
    def sparsity_target(self) -> float | None:
        """Fraction of zero router outputs the λ controller drives towards (None: no controller)."""
        return None

    # ------------------------------------------------------------------ capabilities

    @classmethod
    def refusal(cls, capability: str, options: Mapping[str, Any] | None = None) -> str | None:
        """None when this router (built with ``options``, its keyword options; None: the
        defaults) has ``capability``; else one line naming the router, what it cannot do and
        why. A router whose options withdraw a capability extends this."""
        check_capability(capability)
        if getattr(cls, capability):
            return None
        if capability == "exportable" and cls.not_exportable_reason:
            return f"router {cls.name!r} {CAPABILITIES[capability]}: {cls.not_exportable_reason}"
        reason = next(
            (
                k.__dict__["lacks"][capability]
                for k in cls.__mro__
                if capability in k.__dict__.get("lacks", {})
            ),
            "it does not declare it",
        )
        return f"router {cls.name!r} {CAPABILITIES[capability]}: {reason}"

    @classmethod
    def example_options(cls, seq_len: int) -> dict[str, Any]:
        """Options a small example of the router runs with on sequences of ``seq_len`` tokens
        (tests and benches; none by default)."""
        return {}

    def gate_rows(self, experts_K: Tensor) -> Tensor:
        """Rows of ``weight`` that a router over the routed experts ``experts_K`` keeps: those
        experts' own rows first, in their order, then the rows of any experts that are not
        routed experts (null, zero-computation experts), which every pruned router keeps."""
        return experts_K

    def pruned_state(self, kept_K: Tensor) -> dict[str, Tensor]:
        """This router's ``state_dict`` for the routed experts ``kept_K`` only (ascending ids):
        what a router built for ``len(kept_K)`` experts (and :meth:`pruned_options`) loads. The
        gate's rows are sliced by :meth:`gate_rows`; a router with more per-expert state (a
        bias, an ``[N, N]`` map) slices it too."""
        state = self.state_dict()
        if "weight" in state:
            rows = self.gate_rows(kept_K.cpu()).to(state["weight"].device)
            state["weight"] = state["weight"].index_select(0, rows)
        return state

    def pruned_options(self, kept_K: Tensor) -> dict[str, Any]:
        """Options the pruned router is built with, besides its ``num_experts`` (the same in
        every layer: a hash router's original expert count); none by default."""
        return {}

    def prunes_exactly(self) -> bool:
        """True when, with these options, dropping experts that no token chose leaves every
        token's choices and gates unchanged (gates that do not depend on other experts)."""
        return False

    @torch.no_grad()
    def upcycle_init(self, groups: int) -> None:
        """Start on experts that are ``E`` copies of a dense FFN, each split into ``groups``
        consecutive experts (moelab upcycle's virtual groups): a copy's parts get one gate row,
        so they always score alike. Rows of non-routed experts keep their random init."""
        routed = self.weight[: self.num_experts : groups].clone()  # routed experts' rows first
        self.weight[: self.num_experts] = routed.repeat_interleave(groups, dim=0)

    @torch.no_grad()
    def load_gate(self, gate_ED: Tensor) -> None:
        """Take over a trained TopK gate ``[E, D]`` over the same experts (convert-hf --router):
        its rows become the routed experts' rows; other state keeps its init."""
        if gate_ED.shape != (self.num_experts, self.weight.shape[1]):
            raise ValueError(
                f"router {self.name!r}: a gate of shape {tuple(gate_ED.shape)} does not fit its "
                f"{self.num_experts} experts over {self.weight.shape[1]} features"
            )
        self.weight[: self.num_experts] = gate_ED.to(self.weight.dtype)  # routed rows first


ROUTERS: dict[str, type[Router]] = {}


def register_router(cls: type[Router]) -> type[Router]:
    """Class decorator: make ``cls`` available as ``MoE(router=cls.name)`` and in configs."""
    if not cls.name or cls.name in ROUTERS:
        raise ValueError(f"router name {cls.name!r} is empty or already registered")
    ROUTERS[cls.name] = cls
    return cls


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
