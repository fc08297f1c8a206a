"""Hash routing (Roller et al. 2021, arXiv 2106.04426): a fixed random hash of the token id picks
the expert; nothing about the routing is learnt."""

from __future__ import annotations

import random

import torch
from torch import Tensor

from moelab.layers.base import RoutingContext
from moelab.layers.routers.base import Router, RouterOutput, decision_from_choices, register_router

# A Mersenne prime above any vocabulary size: ((a·id + b) mod P) is a universal hash family
# (Carter & Wegman 1979), and a·id < 2^62 stays exact in int64.
_PRIME = 2**31 - 1


def token_ids_for(x_TD: Tensor, context: RoutingContext | None, router: str) -> Tensor:
    """The flat token ids ``[T]`` of ``x_TD`` from ``context.token_ids``; a clear error when the
    caller did not provide them (routing by token id cannot guess them from ``x``)."""
    ids = None if context is None else context.token_ids
    if ids is None:
        raise ValueError(
            f"router {router!r} routes on token ids and needs context.token_ids (a "
            "RoutingContext with the input ids, which TransformerLM makes per forward); "
            "this MoE was called without them"
        )
    ids_T = ids.reshape(-1)
    if ids_T.shape[0] != x_TD.shape[0]:
        raise ValueError(
            f"context.token_ids has {ids_T.shape[0]} tokens, x has {x_TD.shape[0]}: the ids "
            "must have the leading shape of x"
        )
    return ids_T.to(device=x_TD.device, dtype=torch.long)


@register_router
class HashRouter(Router):
    """Hash layers (Roller, Sukhbaatar, Szlam, Weston 2021, arXiv 2106.04426, §3 eq. 1-2):
    ``h_t = FFN_{hash(x_t)}(h̄_t)`` - token ``x_t`` always goes to the same expert, chosen by a
    fixed random hash of its id (the paper's "Random Hash", its default), with gate weight 1.

    Nothing is learnt, so there is no gate parameter at all (a parameter without gradient would
    trip DDP's unused-parameter check): ``weight`` is a zero, non-persistent buffer kept only so
    code that reads ``router.weight`` (its device, its shape) still works. No aux loss: the
    balance is whatever the token frequencies give.

    The hash is ``((a·id + b) mod P) mod E`` with ``(a, b)`` drawn from ``hash_seed`` (a universal
    hash family, so no vocabulary size is needed). For ``top_k = k > 1`` (e.g. granularity > 1)
    the token gets k distinct experts from k independently seeded hashes (the j-th picks among
    the experts not yet taken), each with weight 1 - the sum of k expert slices, as the paper's
    MultiHash concatenates k expert segments.

    Token ids come only from ``context.token_ids`` (:class:`~moelab.layers.base.RoutingContext`).
    """

    name = "hash"
    method = "hash"

    def __init__(
        self,
        d_model: int,
        num_experts: int,
        top_k: int,
        *,
        hash_seed: int = 0,
        init_std: float = 0.02,
    ) -> None:
        if not isinstance(hash_seed, int) or isinstance(hash_seed, bool) or hash_seed < 0:
            raise ValueError(f"hash_seed must be an integer >= 0, got {hash_seed!r}")
        super().__init__(d_model, num_experts, top_k, init_std=init_std)
        del self.weight  # no learnt gate: see the class docstring
        self.register_buffer("weight", torch.zeros(num_experts, d_model), persistent=False)
        self.hash_seed = hash_seed
        rng = random.Random(hash_seed)
        # Python ints, not a tensor: the same on every device (also "meta", used by configs).
        self.hash_coefs: tuple[tuple[int, int], ...] = tuple(
            (rng.randrange(1, _PRIME), rng.randrange(0, _PRIME)) for _ in range(top_k)
        )

    def experts_of(self, ids_T: Tensor) -> Tensor:
        """The k distinct experts ``[T, k]`` of each token id, in hash order."""
        num_tokens, E = ids_T.shape[0], self.num_experts
        taken_TE = torch.zeros(num_tokens, E, dtype=torch.bool, device=ids_T.device)
        chosen = []
        for j, (a, b) in enumerate(self.hash_coefs):
            slot_T = ((a * ids_T + b) % _PRIME) % (E - j)  # index among the free experts
            free_TE = ~taken_TE
            rank_TE = free_TE.long().cumsum(-1) - 1
            expert_T = (free_TE & (rank_TE == slot_T[:, None])).long().argmax(-1)
            taken_TE[torch.arange(num_tokens, device=ids_T.device), expert_T] = True
            chosen.append(expert_T)
        return torch.stack(chosen, dim=-1)

    def forward(
        self, x_TD: Tensor, valid_T: Tensor | None, context: RoutingContext | None = None
    ) -> RouterOutput:
        ids_T = token_ids_for(x_TD, context, self.name)
        num_tokens = x_TD.shape[0]
        expert_TK = self.experts_of(ids_T)
        weight_TK = torch.ones(expert_TK.shape, dtype=torch.float32, device=x_TD.device)
        decision, nonzero = decision_from_choices(expert_TK, weight_TK, valid_T, self.num_experts)
        # No logits: zeros; the "scores" are the (constant) assignment matrix.
        logits_TE = torch.zeros(num_tokens, self.num_experts, device=x_TD.device)
        scores_TE = torch.zeros_like(logits_TE)
        scores_TE[decision.token_idx_N, decision.expert_idx_N] = 1.0
        return RouterOutput(decision, logits_TE, scores_TE, nonzero)
