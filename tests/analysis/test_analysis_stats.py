"""The statistics on hand-made inputs whose answers are known."""

from __future__ import annotations

import math

import numpy as np
import pytest
from analysis_fixtures import remoe_sparsity

from moelab.analysis import stats


def test_stages_of_scripted_remoe_curve():
    steps = np.arange(1, 301)
    s = np.array([remoe_sparsity(int(t)) for t in steps])
    st = stats.detect_sparsity_stages(steps, s, target=0.875, tolerance=0.025)
    assert st.dense_end == 45
    assert st.settle_step == 96
    assert st.min_sparsity == pytest.approx(0.02)
    tail = s[steps >= 96]
    assert st.settled_mean == pytest.approx(tail.mean())
    assert st.settled_std == pytest.approx(tail.std(ddof=1))  # within-run sample SD
    assert abs(st.settled_mean - 0.875) < 0.001 and st.settled_std < 0.006
    assert st.stage_of(10) == "dense" and st.stage_of(60) == "sparsifying"
    assert st.stage_of(250) == "stable"


def test_stages_never_settling_and_empty():
    steps = np.arange(10)
    st = stats.detect_sparsity_stages(steps, np.linspace(0.0, 0.5, 10), target=0.875)
    assert st.settle_step is None and math.isnan(st.settled_mean)
    assert st.stage_of(9) == "sparsifying"
    empty = stats.detect_sparsity_stages(np.zeros(0), np.zeros(0), target=0.875)
    assert empty.dense_end is None and empty.settle_step is None
    # NaN points (steps that logged no sparsity) are ignored
    s = np.array([np.nan, 0.88, 0.87, 0.875])
    assert stats.detect_sparsity_stages(np.arange(4), s, 0.875).settle_step == 1


def test_settle_index_excursion_resets():
    s = np.array([0.1, 0.87, 0.88, 0.5, 0.87, 0.876])
    assert stats.settle_index(s, 0.875, 0.03) == 4
    assert stats.settle_index(s[:-1].tolist() + [0.2], 0.875, 0.03) is None


def test_router_always_expert_zero():
    T, E = 100, 8
    expert = np.zeros(T, dtype=np.int64)
    load = stats.expert_load(expert, E)
    assert load.tolist() == [T] + [0] * (E - 1)
    assert stats.dead_expert_fraction(load) == pytest.approx((E - 1) / E)
    assert stats.load_imbalance(load) == pytest.approx(E)
    z = stats.gate_mass(expert, np.ones(T), E)
    usage, uneven = stats.usage_unevenness(z)
    assert usage == pytest.approx(1 / E)
    assert uneven == pytest.approx(math.log(E))  # all mass on one expert: the worst case


def test_balanced_load_and_dead_threshold():
    E = 8
    load = np.full(E, 100)
    assert stats.dead_expert_fraction(load) == 0.0
    assert stats.load_imbalance(load) == pytest.approx(1.0)
    usage, uneven = stats.usage_unevenness(load.astype(float))
    assert usage == 1.0 and uneven == pytest.approx(0.0, abs=1e-12)
    # 1/(8E) = 1/64 of the tokens: an expert with 1% is nearly dead, one with 2% is not
    load = np.array([1, 2] + [97 // 6] * 6)
    f = stats.load_fractions(load)
    assert f[0] < 1 / 64 < f[1]
    assert stats.dead_expert_fraction(load) == pytest.approx(1 / 8)
    with pytest.raises(ValueError, match=r"\[0, 8\)"):
        stats.expert_load(np.array([8]), 8)


def test_active_experts_and_frequency():
    active = stats.active_experts_per_token(np.array([0, 0, 1, 3, 3, 3]), num_tokens=5)
    assert active.tolist() == [2, 1, 0, 3, 0]
    counts = np.array([1, 10, 100, 1000, 0])
    assert stats.frequency_bins(counts, 2).tolist() == [0, 0, 1, 1, -1]
    res = stats.active_by_frequency(
        np.array([0, 1, 2, 3, 0]), np.array([3, 3, 1, 1, 5]), counts, num_bins=2
    )
    assert res["bin_mean"] == pytest.approx([11 / 3, 1.0])
    assert res["bin_tokens"] == [3, 2]
    assert res["rare_minus_frequent"] == pytest.approx(11 / 3 - 1)
    with pytest.raises(ValueError, match="outside the frequency table"):
        stats.active_by_frequency(np.array([7]), np.array([1]), counts)


def test_domain_shares_and_kl():
    # domain 0 tokens (0, 1) always go to expert 0; domain 1 tokens (2, 3) to expert 1
    domain = np.array([0, 0, 1, 1])
    shares = stats.domain_expert_shares(np.arange(4), np.array([0, 0, 1, 1]), domain, 2, 2)
    assert shares.tolist() == [[1.0, 0.0], [0.0, 1.0]]
    assert stats.domain_specialisation(shares, [2, 2]) == pytest.approx(math.log(2))
    # no specialisation: both domains split evenly
    same = np.array([[0.5, 0.5], [0.5, 0.5]])
    assert stats.domain_specialisation(same, [1, 3]) == pytest.approx(0.0)
    # unequal domain weights: overall = 0.75*[1,0] + 0.25*[0,1]
    kl = stats.domain_specialisation(shares, [3, 1])
    assert kl == pytest.approx((math.log(1 / 0.75) + math.log(1 / 0.25)) / 2)
    # an empty domain is left out (its row is zeros)
    shares3 = stats.domain_expert_shares(np.arange(4), np.array([0, 0, 1, 1]), domain, 2, 3)
    assert shares3[2].tolist() == [0.0, 0.0]
    assert stats.domain_specialisation(shares3, [2, 2, 0]) == pytest.approx(math.log(2))
    assert stats.kl_divergence([1, 0], [0, 1]) == math.inf


def test_flip_rate_known_flips():
    tok = np.arange(4)
    r = stats.flip_rate(tok, np.array([0, 0, 1, 1]), tok, np.array([0, 1, 1, 0]), 4, 2)
    assert r["token_flip_rate"] == pytest.approx(0.5)
    assert r["assignment_flip_rate"] == pytest.approx(4 / 6)
    same = stats.flip_rate(tok, np.array([0, 0, 1, 1]), tok, np.array([0, 0, 1, 1]), 4, 2)
    assert same == {"token_flip_rate": 0.0, "assignment_flip_rate": 0.0}
    # variable-size sets (ReLU routing): token 0 gains an expert, token 1 loses its only one;
    # token 2 is routed nowhere at both, made no decision and counts in neither share
    r = stats.flip_rate(
        np.array([0, 1]), np.array([0, 1]), np.array([0, 0]), np.array([0, 1]), 3, 2
    )
    assert r["token_flip_rate"] == pytest.approx(2 / 2)
    assert r["assignment_flip_rate"] == pytest.approx(2 / 3)


def test_top_tokens_per_expert():
    token_ids = np.array([5, 6, 5, 7, 6, 5])
    # every position goes to expert 0 with weight = position / 10; expert 1 gets nothing
    tops = stats.top_tokens_per_expert(
        token_ids,
        np.arange(6),
        np.zeros(6, int),
        np.arange(6) / 10,
        num_experts=2,
        k=2,
        min_count=1,
    )
    assert tops[1] == []
    assert [t for t, _, _ in tops[0]] == [7, 6]  # mean weights: 7→0.3, 6→0.25, 5→0.233
    assert tops[0][0][2] == 1 and tops[0][1][1] == pytest.approx(0.25)


def test_mean_std():
    assert stats.mean_std([1.0, 3.0]) == (2.0, pytest.approx(2**0.5))  # sample SD, ddof=1
    m, s = stats.mean_std([float("nan")])
    assert math.isnan(m) and math.isnan(s)
