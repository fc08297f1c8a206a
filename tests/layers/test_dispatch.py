"""Permutation ops one at a time: sort, gather, combine, capacity (megablocks-style small tests)."""

from __future__ import annotations

import pytest
import torch

from moelab.layers import dispatch
from moelab.layers.base import RoutingDecision


def _decision(token_idx, expert_idx, weight=None, num_tokens=None, num_experts=4):
    token_idx, expert_idx = torch.tensor(token_idx), torch.tensor(expert_idx)
    weight = torch.ones(len(token_idx)) if weight is None else torch.tensor(weight)
    return RoutingDecision(
        token_idx_N=token_idx,
        expert_idx_N=expert_idx,
        weight_N=weight,
        tokens_per_expert_E=torch.bincount(expert_idx, minlength=num_experts),
        num_tokens=num_tokens if num_tokens is not None else int(token_idx.max()) + 1,
        num_experts=num_experts,
    )


def test_permute_is_a_stable_sort_by_expert():
    d = _decision([0, 1, 2, 3, 4, 5], [2, 0, 2, 0, 3, 2], [0.1, 0.2, 0.3, 0.4, 0.5, 0.6])
    perm = dispatch.permute(d)
    assert perm.token_idx_N.tolist() == [1, 3, 0, 2, 5, 4]  # token order kept inside an expert
    assert perm.counts == [2, 0, 3, 1]
    torch.testing.assert_close(perm.weight_N, torch.tensor([0.2, 0.4, 0.1, 0.3, 0.6, 0.5]))


def test_permute_keeps_token_order_inside_each_expert_at_scale():
    """An unstable sort passes the small case above by luck (torch sorts short inputs stably
    anyway); thousands of assignments over few experts expose it."""
    g = torch.Generator().manual_seed(0)
    n = 5000
    experts = torch.randint(0, 4, (n,), generator=g)
    d = _decision(list(range(n)), experts.tolist(), torch.rand(n, generator=g).tolist())
    perm = dispatch.permute(d)
    start = 0
    for count in perm.counts:
        block = perm.token_idx_N[start : start + count]
        assert bool((block[1:] > block[:-1]).all())
        start += count


def test_gather_then_combine_with_unit_weights_is_identity_for_top1():
    x = torch.randn(6, 5)
    perm = dispatch.permute(_decision(list(range(6)), [3, 1, 1, 0, 2, 3]))
    torch.testing.assert_close(dispatch.combine(dispatch.gather(x, perm), perm), x)


def test_combine_sums_weighted_rows_and_leaves_unrouted_tokens_zero():
    # token 0 -> experts 0 (w .25) and 1 (w .75); token 2 -> expert 1 (w 2); token 1: nothing
    d = _decision([0, 0, 2], [0, 1, 1], [0.25, 0.75, 2.0], num_tokens=3)
    perm = dispatch.permute(d)
    y_ND = torch.tensor([[1.0], [10.0], [100.0]])  # rows in expert order: (0,e0) (0,e1) (2,e1)
    out = dispatch.combine(y_ND, perm)
    torch.testing.assert_close(out, torch.tensor([[0.25 + 7.5], [0.0], [200.0]]))


def test_apply_capacity_keeps_earliest_tokens_and_counts_drops():
    d = _decision([0, 1, 2, 3, 4, 5, 6], [1, 1, 0, 1, 1, 0, 2], num_experts=3)
    capped = dispatch.apply_capacity(d, capacity=2)
    kept = sorted(zip(capped.expert_idx_N.tolist(), capped.token_idx_N.tolist(), strict=True))
    assert kept == [(0, 2), (0, 5), (1, 0), (1, 1), (2, 6)]
    assert int(capped.dropped) == 2
    assert capped.tokens_per_expert_E.tolist() == [2, 2, 1]


def test_expert_capacity_formula_and_limit():
    assert dispatch.expert_capacity(1.25, num_valid_tokens=100, top_k=2, num_experts=8) == 32
    with pytest.raises(ValueError, match="capacity_factor"):
        dispatch.expert_capacity(1e9, num_valid_tokens=10**6, top_k=2, num_experts=8)


def test_empty_decision_round_trips():
    d = RoutingDecision(
        token_idx_N=torch.zeros(0, dtype=torch.long),
        expert_idx_N=torch.zeros(0, dtype=torch.long),
        weight_N=torch.zeros(0),
        tokens_per_expert_E=torch.zeros(4, dtype=torch.long),
        num_tokens=3,
        num_experts=4,
    )
    perm = dispatch.permute(d)
    x = torch.randn(3, 2)
    assert dispatch.gather(x, perm).shape == (0, 2)
    torch.testing.assert_close(dispatch.combine(dispatch.gather(x, perm), perm), torch.zeros(3, 2))


def test_padded_permutation_gives_equal_blocks_and_the_same_combine():
    torch.manual_seed(0)
    d = _decision([0, 1, 2, 3, 4, 5, 5], [2, 0, 2, 0, 3, 2, 1], torch.rand(7).tolist())
    plain, padded = dispatch.permute(d), dispatch.permute(d, pad_limit=2.0)
    assert padded.padded and padded.counts == [3, 3, 3, 3]
    # expert 0: tokens 1, 3 then one padding slot (token index T = 6, weight 0)
    assert padded.token_idx_N[:3].tolist() == [1, 3, 6] and padded.weight_N[2] == 0
    x = torch.randn(6, 5)
    torch.testing.assert_close(dispatch.gather(x, padded)[2], torch.zeros(5))
    y = {p.padded: dispatch.combine(dispatch.gather(x, p) * 2.0, p) for p in (plain, padded)}
    torch.testing.assert_close(y[True], y[False])
    assert not dispatch.permute(d, pad_limit=1.2).padded  # 12 slots for 7 rows: too much padding
