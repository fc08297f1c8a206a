"""TopK's balance_scope (batch / sequence / global) and the base router's jitter_eps."""

from __future__ import annotations

import pytest
import torch

from moelab.layers import MoE, RoutingContext
from moelab.layers.losses import switch_load_balance_loss
from moelab.layers.routers import ROUTERS, router_options
from router_checks import assert_router_causal

torch.set_num_threads(2)


def test_softmax_routers_expose_jitter_and_z_loss_relu_does_not():
    for name in ("topk", "top_p", "null", "aux_free", "sparsemixer"):
        assert {"jitter_eps", "z_loss_coef"} <= set(router_options(name)), name
        assert router_options(name)["jitter_eps"] == 0.0
    assert "jitter_eps" not in router_options("relu")
    assert set(ROUTERS) >= {"topk", "relu", "top_p", "null", "aux_free", "sparsemixer"}


def test_jitter_is_multiplicative_uniform_and_training_only():
    torch.manual_seed(0)
    moe = MoE(1, 8, 4, 1, jitter_eps=0.1, init_std=1.0)
    x = torch.rand(500, 1) + 0.5
    plain = x @ moe.router.weight.T
    moe.router.train()
    ratio = moe.router.logits(x) / plain  # = U(0.9, 1.1), one draw per (token, input dim)
    assert ratio.min() >= 0.9 - 1e-6 and ratio.max() <= 1.1 + 1e-6
    assert ratio.std() > 0.05  # roughly (0.2 / sqrt(12)) = 0.058
    torch.testing.assert_close(ratio[:, 0], ratio[:, 1])  # the input is jittered, not logits
    moe.router.eval()
    torch.testing.assert_close(moe.router.logits(x), plain)


def test_default_jitter_draws_no_random_numbers_and_keeps_numerics():
    torch.manual_seed(0)
    a = MoE(8, 16, 4, 2)
    torch.manual_seed(0)
    b = MoE(8, 16, 4, 2, jitter_eps=0.0, balance_scope="batch")
    x = torch.randn(10, 8)
    state = torch.get_rng_state()
    ya, yb = a(x), b(x)
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(ya, yb)
    assert torch.equal(a.aux_losses["load_balance"], b.aux_losses["load_balance"])


def _sequence_moe() -> tuple[MoE, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    moe = MoE(8, 16, 4, 2, balance_scope="sequence", init_std=0.5)
    x = torch.randn(3, 5, 8)
    ids = torch.zeros(3, 5, dtype=torch.long)
    return moe, x, ids


def test_sequence_scope_is_the_mean_of_per_sequence_switch_losses():
    moe, x, ids = _sequence_moe()
    mask = torch.ones(3, 5, dtype=torch.bool)
    mask[1, 2:] = False
    mask[2] = False  # an all-padding sequence does not count
    moe(x, token_mask=mask, context=RoutingContext(token_ids=ids))
    got = moe.aux_losses["load_balance"]
    want = []
    for b in range(2):  # each valid sequence alone through the same layer, batch scope
        ref = MoE(8, 16, 4, 2, init_std=0.5)
        ref.load_state_dict(moe.state_dict())
        ref(x[b], token_mask=mask[b])
        want.append(ref.aux_losses["load_balance"])
    torch.testing.assert_close(got, sum(want) / 2)


def test_sequence_scope_of_one_sequence_equals_batch_scope():
    moe, x, ids = _sequence_moe()
    moe(x[:1], context=RoutingContext(token_ids=ids[:1]))
    ref = MoE(8, 16, 4, 2, init_std=0.5)
    ref.load_state_dict(moe.state_dict())
    ref(x[:1])
    torch.testing.assert_close(moe.aux_losses["load_balance"], ref.aux_losses["load_balance"])


def test_sequence_scope_needs_token_ids():
    moe, x, _ = _sequence_moe()
    with pytest.raises(ValueError, match="balance_scope='sequence' needs the sequence structure"):
        moe(x)
    with pytest.raises(ValueError, match="token_ids has 10 tokens, x has 15"):
        moe(x, context=RoutingContext(token_ids=torch.zeros(2, 5, dtype=torch.long)))


def test_global_scope_sums_counts_over_ranks(monkeypatch):
    """With a fake second rank: f_e = (local + other counts) / ((local + other tokens) · k),
    P_e stays local; without a sum handed in (one process) the counts stay local."""
    torch.manual_seed(0)
    moe = MoE(8, 16, 4, 2, balance_scope="global", init_std=0.5)
    x = torch.randn(6, 8)
    moe(x)  # single process: exactly the batch loss
    ref = MoE(8, 16, 4, 2, init_std=0.5)
    ref.load_state_dict(moe.state_dict())
    ref(x)
    torch.testing.assert_close(moe.aux_losses["load_balance"], ref.aux_losses["load_balance"])

    other_counts, other_tokens = torch.tensor([9.0, 1.0, 1.0, 1.0]), 6.0

    def second_rank(t):  # the router sums its counts and its token count in one collective
        return t + torch.cat([other_counts, torch.tensor([other_tokens])]).to(t.dtype)

    moe.router.set_rank_sum(second_rank)  # what moelab.distributed hands in under a launch
    moe(x)
    counts = moe.last_stats.tokens_per_expert.double() + other_counts.double()
    probs = (x @ moe.router.weight.T).softmax(-1).double()
    want = 4 * ((counts / ((6 + other_tokens) * 2)) * probs.mean(0)).sum()
    torch.testing.assert_close(moe.aux_losses["load_balance"].double(), want)
    # the local call alone would give another value: the counts really were summed
    local = switch_load_balance_loss(probs, moe.last_stats.tokens_per_expert, None, 2)
    assert not torch.isclose(local, want)


def test_global_scope_is_per_forward_not_per_step():
    """As docs/moe.md says: ``global`` sums one forward's counts over the ranks; the micro-batches
    of a step are not added up, so a forward's loss does not depend on the forwards before it."""
    torch.manual_seed(0)
    moe = MoE(8, 16, 4, 2, balance_scope="global", init_std=0.5)
    moe.router.set_rank_sum(lambda t: 2 * t)  # two ranks that saw the same tokens
    x1, x2 = torch.randn(6, 8), 3 * torch.randn(6, 8)
    moe(x2)
    alone = moe.aux_losses["load_balance"].detach().clone()
    moe(x1)
    moe(x2)  # the step's second micro-batch
    torch.testing.assert_close(moe.aux_losses["load_balance"].detach(), alone, rtol=0, atol=0)


def test_balance_scope_keeps_routing_causal():
    assert_router_causal("topk", balance_scope="sequence", jitter_eps=0.05)


@pytest.mark.parametrize(
    "options, match",
    [
        (dict(balance_scope="micro"), "balance_scope must be one of 'batch', 'sequence', 'global'"),
        (dict(jitter_eps=-0.1), r"jitter_eps must be in \[0, 1\), got -0.1"),
        (dict(jitter_eps="a"), r"jitter_eps must be a number in \[0, 1\), got 'a'"),
    ],
)
def test_bad_settings_raise_one_clear_error(options, match):
    with pytest.raises(ValueError, match=match):
        MoE(8, 16, 4, 2, **options)
