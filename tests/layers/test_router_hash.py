"""Hash routing: fixed seeded hash of the token id, weight 1, no learnt router parameter."""

from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F

from model_checks import assert_causal, shift_tokens, tiny_lm
from moelab.layers import MoE, RoutingContext

torch.set_num_threads(2)
P = 2**31 - 1


def expert_out(moe: MoE, e: int, x_D: torch.Tensor) -> torch.Tensor:
    gate, up = (x_D @ moe.experts.w13_EDF2[e]).chunk(2)
    return (F.silu(gate) * up) @ moe.experts.w2_EFD[e]


def hand_hash(ids: list[int], seed: int, E: int, k: int) -> list[list[int]]:
    """The hash written out with Python ints: draw (a, b) per hash from ``random.Random(seed)``;
    the j-th hash indexes the experts not yet taken, in increasing order."""
    rng = random.Random(seed)
    coefs = [(rng.randrange(1, P), rng.randrange(0, P)) for _ in range(k)]
    out = []
    for i in range(len(ids)):
        free = list(range(E))
        mine = []
        for j, (a, b) in enumerate(coefs):
            mine.append(free.pop(((a * ids[i] + b) % P) % (E - j)))
        out.append(mine)
    return out


def _ctx(ids: torch.Tensor) -> RoutingContext:
    return RoutingContext(token_ids=ids)


def test_hand_checked_selection_and_weight_one():
    moe = MoE(8, 16, 4, 1, router="hash", hash_seed=3)
    ids = torch.tensor([0, 1, 2, 7, 7, 4095])
    rng = random.Random(3)
    a, b = rng.randrange(1, P), rng.randrange(0, P)
    want = [((a * i + b) % P) % 4 for i in ids.tolist()]
    got = moe.router.experts_of(ids)
    assert got[:, 0].tolist() == want
    assert got[3, 0] == got[4, 0]  # same token, same expert wherever it is
    out = moe.router(torch.randn(6, 8), None, _ctx(ids))
    assert torch.equal(out.decision.weight_N, torch.ones(6))
    # a different seed is a different mapping (on 200 ids at least one moves)
    many = torch.arange(200)
    other = MoE(8, 16, 4, 1, router="hash", hash_seed=4).router.experts_of(many)
    assert not torch.equal(other, moe.router.experts_of(many))


def test_top_k_picks_distinct_experts_as_the_hand_hash():
    moe = MoE(8, 16, 6, 3, router="hash", hash_seed=11)
    ids = torch.arange(0, 500, 7)
    got = moe.router.experts_of(ids)
    assert got.tolist() == hand_hash(ids.tolist(), 11, 6, 3)
    assert all(len(set(row)) == 3 for row in got.tolist())


@pytest.mark.parametrize("k,granularity", [(1, 1), (2, 1), (1, 2)])
def test_matches_per_token_loop_reference(k, granularity):
    torch.manual_seed(0)
    moe = MoE(8, 16, 4, k, router="hash", granularity=granularity, init_std=0.3).double()
    ids = torch.randint(0, 1000, (2, 9))
    x = torch.randn(2, 9, 8, dtype=torch.float64, requires_grad=True)
    y = moe(x, context=_ctx(ids))
    E, K = 4 * granularity, k * granularity
    experts = hand_hash(ids.reshape(-1).tolist(), 0, E, K)
    x_TD = x.reshape(-1, 8)
    y_ref = torch.stack(
        [sum(expert_out(moe, e, x_TD[t]) for e in experts[t]) for t in range(18)]
    ).reshape_as(y)
    torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-12)
    # dropless accounting: every valid token gets exactly K computed assignments
    s = moe.last_stats
    assert int(s.tokens_per_expert.sum()) == 18 * K and s.active_min == s.active_max == K
    assert int(s.dropped) == 0


def test_no_router_parameter_and_no_router_gradient():
    moe = MoE(8, 16, 4, 1, router="hash")
    assert list(moe.router.parameters()) == []
    assert not any(name.startswith("router.") for name in moe.state_dict())
    assert moe.router.weight.shape == (4, 8) and not moe.router.weight.requires_grad
    x = torch.randn(10, 8, requires_grad=True)
    moe(x, context=_ctx(torch.arange(10))).square().sum().backward()
    assert x.grad.abs().sum() > 0  # through the experts only
    assert all(p.grad is not None for p in moe.experts.parameters())
    assert moe.aux_losses == {}


def test_padding_gets_no_assignment():
    moe = MoE(8, 16, 4, 1, router="hash")
    x = torch.randn(2, 5, 8)
    mask = torch.tensor([[True] * 5, [True] * 2 + [False] * 3])
    y = moe(x, token_mask=mask, context=_ctx(torch.randint(0, 99, (2, 5))))
    assert torch.equal(y[~mask], torch.zeros_like(y[~mask]))
    assert int(moe.last_stats.num_tokens) == 7
    assert int(moe.last_stats.tokens_per_expert.sum()) == 7


def test_causal_through_the_model():
    model = tiny_lm("hash")
    ids = torch.randint(0, 50, (2, 10))
    assert_causal(model, ids, shift_tokens(ids, 6, 50), atol=1e-5)  # matmul rounding only


def test_missing_token_ids_and_bad_settings_raise():
    moe = MoE(8, 16, 4, 1, router="hash")
    with pytest.raises(ValueError, match="needs context.token_ids"):
        moe(torch.randn(3, 8))
    with pytest.raises(ValueError, match="needs context.token_ids"):
        moe(torch.randn(3, 8), context=RoutingContext())
    with pytest.raises(ValueError, match="token_ids has 4 tokens, x has 3"):
        moe(torch.randn(3, 8), context=_ctx(torch.arange(4)))
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match=f"hash_seed must be an integer >= 0, got {bad!r}"):
            MoE(8, 16, 4, 1, router="hash", hash_seed=bad)
