"""Hash routing (Roller et al. 2021, arXiv 2106.04426): a fixed random hash of the token id picks
the expert; nothing about the routing is learnt."""

from __future__ import annotations

import random
from typing import Any

import torch
from torch import Tensor

from moelab.layers.base import RoutingContext
from moelab.layers.routers.base import Router, RouterOutput, decision_from_choices, register_router

# A Mersenne prime above any vocabulary size: ((a·id + b) mod P) is a universal hash family
# (Carter & Wegman 1979), and a·id < 2^62 stays exact in int64.
_PRIME = 2**31 - 1


def _nth_free(taken_TE: Tensor, slot_T: Tensor) -> Tensor:
    """Per row, the column of its ``slot_T``-th False entry of ``taken_TE``."""
    free_TE = ~taken_TE
    rank_TE = free_TE.long().cumsum(-1) - 1
    return (free_TE & (rank_TE == slot_T[:, None])).long().argmax(-1)


def _hash_choices(ids_T: Tensor, coefs: tuple[tuple[int, int], ...], E: int) -> Tensor:
    """The hash's k distinct experts ``[T, k]`` among ``E``: the j-th hash picks among the
    experts not yet taken."""
    num_tokens = ids_T.shape[0]
    taken_TE = torch.zeros(num_tokens, E, dtype=torch.bool, device=ids_T.device)
    rows_T = torch.arange(num_tokens, device=ids_T.device)
    chosen = []
    for j, (a, b) in enumerate(coefs):
        slot_T = ((a * ids_T + b) % _PRIME) % (E - j)  # index among the free experts
        expert_T = _nth_free(taken_TE, slot_T)
        taken_TE[rows_T, expert_T] = True
        chosen.append(expert_T)
    return torch.stack(chosen, dim=-1)


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

    Pruning (``moelab prune``) keeps the hash and remaps its table: the hash still picks among
    the ``hash_experts`` experts the router was first built with, and the buffer ``expert_map``
    (``[hash_experts]``, per layer, in the checkpoint) says which expert each of them is now
    (−1: pruned away). A token hashed to a dropped expert takes a kept one it does not already
    have, chosen by the same hash among those; tokens whose experts were all kept route exactly
    as before. ``hash_experts=None`` (default): the table is the identity, and no buffer.
    """

    name = "hash"
    method = "hash"
    prunable = True
    upcyclable = True  # nothing learnt to initialise
    lacks = {"convertible": "it has no gate: it routes by a fixed hash of the token id"}

    def __init__(
        self,
        d_model: int,
        num_experts: int,
        top_k: int,
        *,
        hash_seed: int = 0,
        hash_experts: int | None = None,
        init_std: float = 0.02,
    ) -> None:
        if not isinstance(hash_seed, int) or isinstance(hash_seed, bool) or hash_seed < 0:
            raise ValueError(f"hash_seed must be an integer >= 0, got {hash_seed!r}")
        if hash_experts is not None and (
            not isinstance(hash_experts, int)
            or isinstance(hash_experts, bool)
            or hash_experts < num_experts
        ):
            raise ValueError(
                f"hash_experts must be None or an integer >= num_experts ({num_experts}), "
                f"got {hash_experts!r}"
            )
        super().__init__(d_model, num_experts, top_k, init_std=init_std)
        del self.weight  # no learnt gate: see the class docstring
        self.register_buffer("weight", torch.zeros(num_experts, d_model), persistent=False)
        self.hash_seed = hash_seed
        self.hash_experts = num_experts if hash_experts is None else hash_experts
        table = None
        if hash_experts is not None:  # a pruned table (the first num_experts kept until loaded)
            first_E = torch.arange(hash_experts)
            table = torch.where(first_E < num_experts, first_E, -1)
        self.register_buffer("expert_map", table)
        rng = random.Random(hash_seed)
        # Python ints, not a tensor: the same on every device (also "meta", used by configs).
        self.hash_coefs: tuple[tuple[int, int], ...] = tuple(
            (rng.randrange(1, _PRIME), rng.randrange(0, _PRIME)) for _ in range(top_k)
        )

    def experts_of(self, ids_T: Tensor) -> Tensor:
        """The k distinct experts ``[T, k]`` of each token id, in hash order."""
        chosen_TK = _hash_choices(ids_T, self.hash_coefs, self.hash_experts)
        if self.expert_map is None:
            return chosen_TK
        mapped_TK = self.expert_map.to(ids_T.device)[chosen_TK]
        num_tokens, E = ids_T.shape[0], self.num_experts
        rows_T = torch.arange(num_tokens, device=ids_T.device)
        taken_TE = torch.zeros(num_tokens, E + 1, dtype=torch.bool, device=ids_T.device)
        taken_TE[rows_T[:, None], mapped_TK] = True  # column E: "dropped", cut off below
        taken_TE = taken_TE[:, :E]
        for j, (a, b) in enumerate(self.hash_coefs):  # dropped picks: a kept expert not taken
            dropped_T = mapped_TK[:, j] < 0
            n_free_T = (~taken_TE).sum(-1).clamp_min(1)
            substitute_T = _nth_free(taken_TE, ((a * ids_T + b) % _PRIME) % n_free_T)
            mapped_TK[:, j] = torch.where(dropped_T, substitute_T, mapped_TK[:, j])
            taken_TE[rows_T[dropped_T], substitute_T[dropped_T]] = True
        return mapped_TK

    def pruned_options(self, kept_K: Tensor) -> dict[str, Any]:
        """The same hash over the experts it was first built with."""
        return {"hash_experts": self.hash_experts}

    def pruned_state(self, kept_K: Tensor) -> dict[str, Tensor]:
        """The table remapped: a hashed expert that is kept becomes its index among ``kept_K``,
        any other −1."""
        now_E0 = torch.arange(self.hash_experts) if self.expert_map is None else self.expert_map
        now_E0 = now_E0.cpu()
        position = torch.full((self.num_experts + 1,), -1, dtype=torch.long)  # [-1] stays -1
        position[kept_K.cpu()] = torch.arange(len(kept_K))
        return {"expert_map": position[now_E0]}

    def prunes_exactly(self) -> bool:
        """A token whose experts were all kept is hashed to them as before."""
        return True

    def upcycle_init(self, groups: int) -> None:
        """Nothing learnt: the hash spreads tokens over all the copies' parts."""

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
