"""The layerwise recurrent router (RMoE): routing that remembers the previous layers' routing."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor, nn

from moelab.layers.base import RoutingContext
from moelab.layers.routers.base import RouterOutput, register_router
from moelab.layers.routers.topk import TopKRouter

CONTEXT_KEY = "rmoe_hidden"


class LayerwiseGRU(nn.Module):
    """A GRU cell (Cho et al. 2014) run over the *layers* of one token, not over its sequence.

    ``h' = (1 − z)·n + z·h`` with ``r = σ(W_ir x + b_ir + W_hr h + b_hr)``, ``z = σ(W_iz x + b_iz
    + W_hz h + b_hz)``, ``n = tanh(W_in x + b_in + r·(W_hn h + b_hn))``: the gate order and
    initialisation (uniform ±1/√H) of :class:`torch.nn.GRUCell`, written out so that it runs in
    the router's float32 (float64 for reference tests) whatever the parameters' dtype.
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dim = dim
        self.w_ih = nn.Parameter(torch.empty(3 * dim, dim))
        self.w_hh = nn.Parameter(torch.empty(3 * dim, dim))
        self.b_ih = nn.Parameter(torch.empty(3 * dim))
        self.b_hh = nn.Parameter(torch.empty(3 * dim))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        bound = self.dim**-0.5
        for p in (self.w_ih, self.w_hh, self.b_ih, self.b_hh):
            nn.init.uniform_(p, -bound, bound)

    def forward(self, x_TH: Tensor, h_TH: Tensor) -> Tensor:
        dtype = x_TH.dtype
        gi_r, gi_z, gi_n = torch.nn.functional.linear(
            x_TH, self.w_ih.to(dtype), self.b_ih.to(dtype)
        ).chunk(3, dim=-1)
        gh_r, gh_z, gh_n = torch.nn.functional.linear(
            h_TH, self.w_hh.to(dtype), self.b_hh.to(dtype)
        ).chunk(3, dim=-1)
        r = torch.sigmoid(gi_r + gh_r)
        z = torch.sigmoid(gi_z + gh_z)
        n = torch.tanh(gi_n + r * gh_n)
        return (1 - z) * n + z * h_TH


@register_router
class RecurrentRouter(TopKRouter):
    """Layerwise Recurrent Router for MoE (Qiu, Huang, Cheng, Zhou, Wang, Titov & Fu 2024,
    arXiv 2408.06793, eqs. 4-6).

    Layer ``i`` projects its input to ``hidden_dim`` (eq. 4, ``x'_i = x_i W_p^i``, a projector
    of its own), runs one step of a GRU whose state is the previous routed layer's GRU output
    (eq. 5, ``h_i = GRU(x'_i, h_{i−1})``, ``h_0 = 0``) and routes on that state (eq. 6, logits
    ``h_i W_g^i``) with TopK's softmax + top-k and Switch balance loss (every option of
    ``topk`` applies). As in the paper, the GRU is **shared by all layers**
    (:func:`share_recurrent_routers`, which :class:`~moelab.model.TransformerLM` runs) while
    projector and gate are per layer; the state reaches the next layer with its gradient
    (through :class:`~moelab.layers.base.RoutingContext` under ``"rmoe_hidden"``), so one
    layer's routing trains the previous layers' projectors.

    Args:
        hidden_dim: width of the projection and the GRU state (the paper's 128).
    """

    name = "rmoe"
    method = "rmoe"
    bench_shapes = False  # TopK's stays with TopK
    convertible = False
    lacks = {
        "convertible": "its gate reads the GRU state, not the hidden state a TopK gate reads",
    }

    def __init__(
        self,
        d_model: int,
        num_experts: int,
        top_k: int,
        *,
        hidden_dim: int = 128,
        renormalize: bool = False,
        softmax_after_topk: bool = False,
        balance_coef: float = 0.01,
        z_loss_coef: float = 0.0,
        jitter_eps: float = 0.0,
        init_std: float = 0.02,
    ) -> None:
        if not isinstance(hidden_dim, int) or isinstance(hidden_dim, bool) or hidden_dim < 1:
            raise ValueError(f"hidden_dim must be a positive integer, got {hidden_dim!r}")
        # The gate (``self.weight``, [E, hidden_dim]) reads the GRU state, not x.
        super().__init__(
            hidden_dim,
            num_experts,
            top_k,
            renormalize=renormalize,
            softmax_after_topk=softmax_after_topk,
            balance_coef=balance_coef,
            z_loss_coef=z_loss_coef,
            jitter_eps=jitter_eps,
            init_std=init_std,
        )
        self.hidden_dim = hidden_dim
        self.proj = nn.Parameter(torch.empty(hidden_dim, d_model))  # W_p, nn.Linear layout
        nn.init.normal_(self.proj, std=init_std)
        self.gru = LayerwiseGRU(hidden_dim)

    def model_shared_parameters(self) -> list[nn.Parameter]:
        """The GRU's: one for the whole model (:func:`share_recurrent_routers`)."""
        return list(self.gru.parameters())

    def recur(self, x_TD: Tensor, context: RoutingContext | None) -> Tensor:
        """This layer's GRU state ``h_i`` ``[T, hidden_dim]`` (float32 or wider), passed on."""
        dtype = torch.promote_types(x_TD.dtype, torch.float32)
        with torch.autocast(device_type=x_TD.device.type, enabled=False):
            x_TH = torch.nn.functional.linear(x_TD.to(dtype), self.proj.to(dtype))
            h_prev = None if context is None else context.get(CONTEXT_KEY)
            if h_prev is None:
                h_prev = x_TH.new_zeros(x_TH.shape)
            elif h_prev.shape != x_TH.shape:
                raise ValueError(
                    f"the previous layer's RMoE state has shape {tuple(h_prev.shape)}, this "
                    f"layer's {tuple(x_TH.shape)}: every 'rmoe' layer needs the same hidden_dim"
                )
            h_TH = self.gru(x_TH, h_prev.to(dtype))
        if context is not None:
            context.pass_on(CONTEXT_KEY, h_TH)
        return h_TH

    def forward(
        self, x_TD: Tensor, valid_T: Tensor | None, context: RoutingContext | None = None
    ) -> RouterOutput:
        return super().forward(self.recur(x_TD, context), valid_T, context)


def share_recurrent_routers(modules: Iterable[nn.Module]) -> None:
    """Give every :class:`RecurrentRouter` among ``modules`` (and their children) the first one's
    GRU: the paper shares one GRU across all layers. Idempotent; the shared parameters appear in
    the state dict under every layer's name and load into the one tensor."""
    routers = [m for top in modules for m in top.modules() if isinstance(m, RecurrentRouter)]
    for router in routers[1:]:
        if router.hidden_dim != routers[0].hidden_dim:
            raise ValueError(
                f"hidden_dim must be the same in every 'rmoe' layer (they share one GRU), got "
                f"{routers[0].hidden_dim} and {router.hidden_dim}"
            )
        router.gru = routers[0].gru
