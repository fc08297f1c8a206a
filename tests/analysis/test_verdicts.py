"""The verdict rule against references written differently: the t distribution by numerical
integration of its density and by printed tables, the t statistic by hand, the sign test by
enumerating every sign pattern, and the verdict at the edges of its interval."""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import numpy as np
import pytest

from moelab.analysis import claims, stats
from moelab.analysis.suite_data import SuiteData
from moelab.analysis.verdict import (
    combine,
    judge,
    paired_test,
    sample_sd,
    sign_test_p,
    t_central,
    t_quantile,
)


def _t_density(x: np.ndarray, df: int) -> np.ndarray:
    c = math.exp(math.lgamma((df + 1) / 2) - math.lgamma(df / 2)) / math.sqrt(df * math.pi)
    return c * (1 + x**2 / df) ** (-(df + 1) / 2)


@pytest.mark.parametrize("df", [1, 2, 3, 4, 5, 8, 11])
@pytest.mark.parametrize("t", [0.0, 0.3, 1.0, 2.5, 7.0])
def test_t_central_matches_the_integrated_density(df, t):
    x = np.linspace(0.0, t, 20001)  # Simpson's rule on [0, t], doubled (the density is even)
    y = _t_density(x, df)
    h = x[1] - x[0] if t > 0 else 0.0
    simpson = h / 3 * (y[0] + y[-1] + 4 * y[1:-1:2].sum() + 2 * y[2:-1:2].sum())
    assert t_central(t, df) == pytest.approx(2 * simpson, abs=1e-9)
    assert t_central(-t, df) == t_central(t, df)


@pytest.mark.parametrize(
    "df, crit",  # two-sided 95% critical values as printed in t tables
    [(1, 12.706), (2, 4.303), (3, 3.182), (4, 2.776), (9, 2.262), (30, 2.042)],
)
def test_t_quantile_matches_printed_tables(df, crit):
    assert t_quantile(0.95, df) == pytest.approx(crit, abs=5e-4)


def test_paired_test_by_hand():
    # d = 1, 2, 3: mean 2, SD 1, t = 2 / (1/√3) = 2√3; for 2 df, P(|T| <= t) = t / √(2 + t²)
    res = paired_test([1.0, 2.0, 3.0])
    t = 2 * math.sqrt(3)
    assert (res.n, res.mean, res.sd) == (3, 2.0, pytest.approx(1.0))
    assert res.t == pytest.approx(t)
    assert res.p == pytest.approx(1 - t / math.sqrt(2 + t * t))
    half = 4.302652729749464 / math.sqrt(3)  # t_{0.975, 2} · SD / √n
    assert (res.low, res.high) == (pytest.approx(2 - half), pytest.approx(2 + half))
    # the differences of two settings, paired by seed, are what is tested
    a, b = np.array([5.8, 5.9, 5.85]), np.array([6.4, 6.3, 6.45])
    assert paired_test(a - b).t == pytest.approx(
        (a - b).mean() / ((a - b).std(ddof=1) / math.sqrt(3))
    )


def test_sign_test_matches_enumeration():
    for n in range(1, 9):
        for k in range(n + 1):
            extreme = max(k, n - k)
            count = sum(
                max(sum(p), n - sum(p)) >= extreme for p in itertools.product((0, 1), repeat=n)
            )
            assert sign_test_p(k, n) == pytest.approx(min(1.0, count / 2**n))
    assert sign_test_p(3, 3) == 0.25  # 3/3 seeds alone never reach p < 0.05


def test_verdict_boundaries():
    crit = t_quantile(0.95, 2) / math.sqrt(3)  # the interval's half width per unit SD, n = 3

    def diffs(m: float) -> list[float]:
        return [m - 1.0, m, m + 1.0]  # SD 1

    assert judge(paired_test(diffs(-1.001 * crit)), -1) == "yes"
    assert judge(paired_test(diffs(-0.999 * crit)), -1) == "not shown (3 seeds)"
    assert judge(paired_test(diffs(1.001 * crit)), -1) == "contradicted"
    assert judge(paired_test(diffs(1.001 * crit)), +1) == "yes"
    assert judge(paired_test(diffs(0.0)), +1) == "not shown (3 seeds)"
    # one seed: no spread, no test: indicative at most
    assert judge(paired_test([-5.0]), -1) == "indicative"
    assert judge(paired_test([5.0]), -1) == "not shown (1 seed)"
    # identical differences: the interval is that point
    assert judge(paired_test([0.2, 0.2]), +1) == "yes"
    assert judge(paired_test([0.0, 0.0]), +1) == "not shown (2 seeds)"
    assert judge(paired_test([]), -1) is None
    assert combine(["yes", "indicative"]) == "indicative"
    assert combine(["yes", "contradicted"]) == "contradicted"
    assert combine(["yes", "not shown (3 seeds)"]) == "not shown (3 seeds)"


def test_spreads_are_sample_sds():
    assert sample_sd([1.0, 3.0]) == pytest.approx(math.sqrt(2))
    assert stats.mean_std([1.0, 3.0]) == (2.0, pytest.approx(math.sqrt(2)))
    assert math.isnan(sample_sd([1.0]))


def _suite(losses: dict[str, list[float]], analysis: dict | None = None) -> SuiteData:
    groups = {g: [f"{g}-seed{s}" for s in range(len(v))] for g, v in losses.items()}
    seeds = {n: int(n.rsplit("seed", 1)[1]) for ns in groups.values() for n in ns}

    class Run:
        def __init__(self, v: float) -> None:
            self.v = v

        def final_val(self) -> dict:
            return {"val_loss": self.v, "val_loss_by_domain": {}}

    runs = {f"{g}-seed{s}": Run(x) for g, v in losses.items() for s, x in enumerate(v)}
    return SuiteData("t", Path("."), {}, runs, seeds, groups, analysis or {})  # type: ignore[arg-type]


def test_the_issue_cases_get_the_new_verdicts():
    # a better mean on 1 of 3 seeds (sparsemixer vs dense, t = -0.37) is not shown, not "partly"
    sd = _suite({"a": [6.30, 5.97, 6.22], "b": [6.10, 6.30, 6.25]})
    text, verdict = claims._beats(sd, "a", "b")
    assert verdict == "not shown (3 seeds)" and "paired t-test over 3 seeds" in text
    # a clearly worse setting is contradicted, not merely "no"
    sd = _suite({"a": [6.42, 6.43, 6.40], "b": [6.22, 6.20, 6.24]})
    assert claims._beats(sd, "a", "b")[1] == "contradicted"
    # one seed: indicative at most, however large the difference
    sd = _suite({"a": [5.0], "b": [6.0]})
    assert claims._beats(sd, "a", "b")[1] == "indicative"


def _dyn(layer_means: list[float], layer_sd: float, overall: float = 0.875) -> dict:
    return {
        "dynamics": {
            "stages": {
                "target": 0.875,
                "tolerance": 0.03,
                "settle_step": 80,
                "settled_mean": overall,
                "settled_std": 0.01,
                "min_sparsity": 0.3,
            },
            "layer_sparsity": {
                str(i): {"mean": m, "std": layer_sd} for i, m in enumerate(layer_means)
            },
        }
    }


def test_sparsity_is_judged_per_layer_with_the_within_run_spread():
    # the overall mean sits on the target, but the layers do not (0.62 / 0.96 / 0.96 / 0.95)
    off = {
        f"r-seed{s}": _dyn([0.62 + d, 0.96, 0.96 - d, 0.95], 0.012)
        for s, d in enumerate((0, 0.005, -0.004))
    }
    sd = _suite({"r": [1.0, 1.0, 1.0]}, off)
    text, verdict = claims._settles(sd, "r")
    assert verdict == "contradicted" and "layer 0 0.62" in text and "off target" in text
    # every layer within two within-run SDs of the target on every seed
    on = {
        f"r-seed{s}": _dyn([0.875 + d, 0.876, 0.874 - d, 0.875], 0.012)
        for s, d in enumerate((0, 0.001, -0.001))
    }
    assert claims._settles(_suite({"r": [1.0] * 3}, on), "r")[1] == "yes"
    one = {"r-seed0": _dyn([0.875, 0.88, 0.87, 0.875], 0.012)}
    assert claims._settles(_suite({"r": [1.0]}, one), "r")[1] == "indicative"


def test_flip_rate_counts_assignments_so_a_collapsed_layer_is_not_steady():
    # 100 tokens; at both checkpoints only tokens 0 and 1 reach an expert, each another one
    tok = np.array([0, 1])
    r = stats.flip_rate(tok, np.array([0, 1]), tok, np.array([1, 0]), 100, 2)
    assert r["assignment_flip_rate"] == 1.0  # every assignment changed
    assert r["token_flip_rate"] == 1.0  # of the tokens routed at all (was 0.02: "steady")
    res = {"stability": {"layers": {"0": r, "1": {"assignment_flip_rate": 0.0}}}}
    assert claims._flip(res) == pytest.approx(0.5)  # per layer, then the mean


def test_peer_optim_claims_pair_each_row_wise_mode_with_exact_adamw():
    from moelab.analysis.claims_paper import peer_optim_claims

    # row-wise lower on every seed by about the spread; bf16 the same as exact AdamW ± noise
    sd = _suite(
        {
            "lazy": [5.80, 5.90, 5.85],
            "rowwise": [5.70, 5.79, 5.76],
            "rowwise_bf16": [5.82, 5.88, 5.86],
        }
    )
    got = {claim: ev for claim, _, ev in peer_optim_claims(sd)}
    lower = got["row-wise Adam trains PEER's tables to a lower loss"]
    assert lower[1] == "yes" and "seed SD of exact AdamW 0.050" in lower[0]
    assert got["row-wise Adam costs loss against exact AdamW"][1] == "contradicted"
    assert got["row-wise Adam, bf16 m costs loss against exact AdamW"][1] == "not shown (3 seeds)"
