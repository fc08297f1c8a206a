"""One rule for every verdict on a paper's claim: a paired comparison over matched seeds.

A claim compares two settings trained with the same seeds (same initialisation seed, same data
order), or one setting with a threshold. The per-seed differences ``d_s`` get a paired t-test:
the mean difference, its 95% confidence interval ``mean ± t_{0.975, n-1} · SD / √n`` (SD the
sample standard deviation, ddof=1) and the two-sided p-value. The verdict is

* **yes** when the interval excludes zero in the claimed direction,
* **contradicted** when it excludes zero the other way,
* **not shown (n seeds)** otherwise,
* **indicative** at most with one seed (no spread, so no test): the difference points the claimed
  way, nothing more.

Only numpy and the standard library: the Student t distribution for an integer number of
degrees of freedom has a closed form (Abramowitz & Stegun 26.7.3-4), and its quantile is found by
bisection. The exact two-sided sign test (how many seeds point the claimed way) is reported
beside it, so a reader sees that 3/3 seeds alone cannot reach p < 0.05 (p = 0.25).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

LEVEL = 0.95  # confidence level of every interval in a verdict
YES, CONTRADICTED, INDICATIVE = "yes", "contradicted", "indicative"


def sample_sd(values: list[float] | np.ndarray) -> float:
    """Sample standard deviation (ddof=1) of the finite values; NaN with fewer than two."""
    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v)]
    return float(v.std(ddof=1)) if v.size >= 2 else float("nan")


def t_central(t: float, df: int) -> float:
    """``P(|T| <= |t|)`` for Student's t with ``df`` (a positive integer) degrees of freedom, by
    the finite series of Abramowitz & Stegun 26.7.3 (odd df) and 26.7.4 (even df)."""
    if not isinstance(df, int) or df < 1:
        raise ValueError(f"df: must be a positive integer, got {df!r}")
    if math.isinf(t):
        return 1.0
    theta = math.atan(abs(t) / math.sqrt(df))
    s, c2 = math.sin(theta), math.cos(theta) ** 2
    if df % 2 == 0:  # sinθ (1 + ½cos²θ + (1·3)/(2·4) cos⁴θ + ...), df/2 terms
        term, total = 1.0, 1.0
        for j in range(1, df // 2):
            term *= c2 * (2 * j - 1) / (2 * j)
            total += term
        return min(1.0, s * total)
    # df odd: (2/π)(θ + sinθ cosθ (1 + (2/3)cos²θ + (2·4)/(3·5) cos⁴θ + ...)), (df-1)/2 terms
    if df == 1:
        return 2.0 * theta / math.pi
    term, total = 1.0, 1.0
    for j in range(1, (df - 1) // 2):
        term *= c2 * (2 * j) / (2 * j + 1)
        total += term
    return min(1.0, 2.0 / math.pi * (theta + s * math.cos(theta) * total))


def t_quantile(level: float, df: int) -> float:
    """The ``t`` with ``P(|T| <= t) = level`` (two-sided critical value), by bisection."""
    if not 0.0 < level < 1.0:
        raise ValueError(f"level: must lie in (0, 1), got {level!r}")
    lo, hi = 0.0, 1.0
    while t_central(hi, df) < level:
        hi *= 2.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if t_central(mid, df) < level else (lo, mid)
    return 0.5 * (lo + hi)


def sign_test_p(agree: int, n: int) -> float:
    """Exact two-sided sign test: the probability, with each seed equally likely to point either
    way, of a split at least as uneven as ``agree`` of ``n``."""
    if n == 0:
        return 1.0
    k = max(agree, n - agree)
    return min(1.0, 2.0 * sum(math.comb(n, i) for i in range(k, n + 1)) / 2.0**n)


@dataclass(frozen=True)
class PairedTest:
    """A paired t-test on per-seed differences: ``n`` seeds, their mean difference, sample SD
    (ddof=1), t statistic, two-sided p-value and ``level`` confidence interval ``[low, high]``.
    With one seed ``sd``, ``t``, ``p`` are NaN and the interval is the single difference."""

    n: int
    mean: float
    sd: float
    t: float
    p: float
    low: float
    high: float
    level: float = LEVEL

    @property
    def df(self) -> int:
        return self.n - 1


def paired_test(diffs: list[float] | np.ndarray, level: float = LEVEL) -> PairedTest | None:
    """Paired t-test of ``diffs`` (one per seed, ``a_s − b_s``, or ``value_s − threshold``
    for a one-sample claim); None when there is no finite difference."""
    d = np.asarray(diffs, dtype=np.float64)
    d = d[np.isfinite(d)]
    n = int(d.size)
    if n == 0:
        return None
    mean = float(d.mean())
    if n == 1:
        nan = float("nan")
        return PairedTest(1, mean, nan, nan, nan, mean, mean, level)
    sd = float(d.std(ddof=1))
    se = sd / math.sqrt(n)
    if se == 0.0:  # every seed gave the same difference: the interval is that point
        t = 0.0 if mean == 0.0 else math.copysign(math.inf, mean)
        return PairedTest(n, mean, sd, t, 1.0 if mean == 0.0 else 0.0, mean, mean, level)
    t = mean / se
    half = t_quantile(level, n - 1) * se
    return PairedTest(n, mean, sd, t, 1.0 - t_central(t, n - 1), mean - half, mean + half, level)


def judge(test: PairedTest | None, direction: float) -> str | None:
    """The verdict on a claim that the difference has the sign of ``direction`` (−1: lower,
    +1: higher): yes / contradicted / not shown (n seeds) / indicative (one seed)."""
    if test is None:
        return None
    if test.n == 1:
        return INDICATIVE if direction * test.mean > 0 else "not shown (1 seed)"
    if direction * test.low > 0 and direction * test.high > 0:
        return YES
    if direction * test.low < 0 and direction * test.high < 0:
        return CONTRADICTED
    return f"not shown ({test.n} seeds)"


def combine(verdicts: list[str]) -> str:
    """One verdict for a claim made of several ("at every E"): contradicted if any part is,
    yes if every part is, indicative if every part is at least indicative, else not shown."""
    if not verdicts:
        return "not shown (no data)"
    if CONTRADICTED in verdicts:
        return CONTRADICTED
    if all(v == YES for v in verdicts):
        return YES
    if all(v in (YES, INDICATIVE) for v in verdicts):
        return INDICATIVE
    return next(v for v in verdicts if v.startswith("not shown"))


def _num(x: float, digits: int) -> str:
    return f"{x:+.{digits}f}"


def describe(test: PairedTest, digits: int = 3) -> str:
    """The test in words: the difference, its interval, t and p, e.g. ``difference -0.534
    (95% CI -0.973 to -0.096; paired t-test over 3 seeds: t = -5.24, p = 0.0345)``."""
    if test.n == 1:
        return f"difference {_num(test.mean, digits)} (one seed, no test)"
    pct = f"{100 * test.level:.0f}%"
    t = ("+∞" if test.t > 0 else "-∞") if math.isinf(test.t) else f"{test.t:.2f}"
    return (
        f"difference {_num(test.mean, digits)} ({pct} CI {_num(test.low, digits)} to "
        f"{_num(test.high, digits)}; paired t-test over {test.n} seeds: t = {t}, p = "
        f"{test.p:.3g})"
    )


def seeds_agreeing(diffs: list[float], direction: float) -> str:
    """``k/n seeds <claimed way>, exact sign test p`` for the per-seed differences."""
    d = [x for x in diffs if math.isfinite(x)]
    k = sum(direction * x > 0 for x in d)
    return f"{k}/{len(d)} seed{'s' * (len(d) != 1)} (sign test p = {sign_test_p(k, len(d)):.3g})"
