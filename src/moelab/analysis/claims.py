"""Verdicts on the papers' claims, computed from a suite's committed files.

Each rule returns ``(claim, evidence, verdict)`` by one rule (:mod:`moelab.analysis.verdict`): a
paired t-test over matched seeds, "yes" when the 95% confidence interval of the mean difference
excludes zero in the claimed direction, "contradicted" when it excludes zero the other way, "not
shown (n seeds)" otherwise, "indicative" at most with one seed. The evidence names the test, so a
rerun that changes an outcome changes the verdict and says why."""

from __future__ import annotations

from typing import Any

import numpy as np

from moelab.analysis.compute import COMPUTE_TOLERANCE, compute_matched
from moelab.analysis.suite_data import SuiteData, _layer_mean, _pm, _si
from moelab.analysis.suites import SUITES
from moelab.analysis.tables import assignment_flips
from moelab.analysis.verdict import (
    CONTRADICTED,
    INDICATIVE,
    YES,
    combine,
    describe,
    judge,
    paired_test,
    seeds_agreeing,
)
from moelab.rundir import RunDir

# ----------------------------------------------------------------------------- claims

Verdict = tuple[str, str]  # (evidence, verdict)


def _compare(
    a: dict[int, float],
    b: dict[int, float] | float,
    what: str,
    unit: str = "",
    digits: int = 3,
    higher: bool = False,
) -> Verdict | None:
    """Is ``a`` lower than ``b`` (higher with ``higher``)? ``b`` is a second setting's
    ``seed → value`` (paired on the seeds both have) or a fixed threshold (one-sample)."""
    seeds = sorted(set(a) & set(b)) if isinstance(b, dict) else sorted(a)
    if not seeds:
        return None
    other = b if isinstance(b, dict) else dict.fromkeys(seeds, float(b))
    diffs = [a[s] - other[s] for s in seeds]
    direction = 1.0 if higher else -1.0
    test = paired_test(diffs)
    if test is None:  # no finite difference
        return None
    ma, mb = np.mean([a[s] for s in seeds]), np.mean([other[s] for s in seeds])
    ref = f"{mb:.{digits}f}{unit}" if isinstance(b, dict) else f"the threshold {mb:g}{unit}"
    way = "higher" if higher else "lower"
    text = f"{what} {ma:.{digits}f}{unit} vs {ref}: {describe(test, digits)}"
    if len(seeds) > 1:
        text += f"; {way} on {seeds_agreeing(diffs, direction)}"
    return text, judge(test, direction)


def _per_e(parts: dict[int, Verdict]) -> Verdict:
    """One claim over several numbers of experts: each E's evidence, one combined verdict."""
    return (
        "; ".join(f"E={e}: {text} ({v})" for e, (text, v) in parts.items()),
        combine([v for _, v in parts.values()]),
    )


def _domains(sd: SuiteData, ga: str, gb: str) -> str:
    doms: dict[str, list[float]] = {}
    for g, sgn in ((ga, 1.0), (gb, -1.0)):
        for n in sd.groups.get(g, []):
            for d, v in sd.runs[n].final_val()["val_loss_by_domain"].items():
                doms.setdefault(d, []).append(sgn * float(v) / len(sd.groups[g]))
    better = sum(sum(v) < 0 for v in doms.values())
    return f"; lower mean on {better}/{len(doms)} domains" if doms else ""


def _beats(sd: SuiteData, ga: str, gb: str) -> Verdict | None:
    res = _compare(sd.losses(ga), sd.losses(gb), "val loss")
    if res is None:
        return None
    return res[0] + _domains(sd, ga, gb), res[1]


def _at_equal_compute(sd: SuiteData, ga: str, gb: str) -> Verdict | None:
    """:func:`_beats` where measured FLOPs/token are within the tolerance (compute_matched);
    beyond it a win while spending more, or a loss while spending less, is not shown."""
    res = _beats(sd, ga, gb)
    runs = {g: [sd.runs[n] for n in sd.groups.get(g, [])] for g in (ga, gb)}
    m = compute_matched(runs[ga], runs[gb])
    if res is None or m is None:
        return res
    diff, matched = m
    text = f"{res[0]}; measured FLOPs/token {100 * diff:+.0f}%"
    if matched:
        return text + f" (within {100 * COMPUTE_TOLERANCE:.0f}%: equal compute)", res[1]
    text += f" (beyond {100 * COMPUTE_TOLERANCE:.0f}%: not equal compute)"
    if (diff > 0 and res[1] in (YES, INDICATIVE)) or (diff < 0 and res[1] == CONTRADICTED):
        return text, "not shown (unequal compute)"
    return text, res[1]


# how far a layer's settled sparsity may sit from the target, in within-run SDs of that layer
WITHIN_RUN_SDS = 2.0


def _settles(sd: SuiteData, g: str) -> Verdict | None:
    """Per layer: the deviation of each seed's settled sparsity from the target, against a
    margin of ``WITHIN_RUN_SDS`` times the layer's own within-run SD (its step-to-step spread
    after settling, ddof=1; the paper's ± 0.0061 is such a spread). A layer holds the target
    when the 95% CI of its mean deviation lies inside the margin, misses it when the CI lies
    outside; "yes" needs every layer to hold it, one layer missing it contradicts the claim."""
    dyn = {sd.seeds[n]: sd.analysis.get(n, {}).get("dynamics", {}) for n in sd.groups.get(g, [])}
    dyn = {s: d for s, d in dyn.items() if d.get("stages")}
    if not dyn:
        return None
    target = next(iter(dyn.values()))["stages"]["target"]
    settled = {s: d for s, d in dyn.items() if d["stages"].get("settle_step") is not None}
    if len(settled) < len(dyn):
        return (
            f"settled within ±{next(iter(dyn.values()))['stages']['tolerance']} of "
            f"{target:.3f} on {len(settled)}/{len(dyn)} seeds",
            f"not shown ({len(settled)}/{len(dyn)} seeds settled)",
        )
    overall = [d["stages"]["settled_mean"] for d in settled.values()]
    layers = sorted({lk for d in settled.values() for lk in d.get("layer_sparsity", {})}, key=str)
    parts, verdicts = [], []
    for lk in layers:
        rows = [d["layer_sparsity"].get(lk) or {} for d in settled.values()]
        means = [r["mean"] for r in rows if r.get("mean") is not None]
        sds = [r["std"] for r in rows if r.get("std") is not None]
        if not means or not sds:
            continue
        margin = WITHIN_RUN_SDS * float(np.mean(sds))
        test = paired_test([m - target for m in means])
        if test is None:
            continue
        if test.n == 1:
            v = INDICATIVE if abs(test.mean) <= margin else "not shown (1 seed)"
        elif -margin <= test.low and test.high <= margin:
            v = YES
        elif test.high < -margin or test.low > margin:
            v = CONTRADICTED
        else:
            v = f"not shown ({test.n} seeds)"
        verdicts.append(v)
        ci = "" if test.n == 1 else f", CI {test.low:+.3f} to {test.high:+.3f}"
        word = {YES: "on target", CONTRADICTED: "off target"}.get(v, v)
        parts.append(
            f"layer {lk} {float(np.mean(means)):.3f} (deviation {test.mean:+.3f}{ci}; margin "
            f"±{margin:.3f}: {word})"
        )
    text = (
        f"overall S = {_pm(overall, 4)} after settling (target {target:.3f}); per layer, 95% "
        f"CI over {len(settled)} seed{'s' * (len(settled) != 1)} of the deviation vs "
        f"±{WITHIN_RUN_SDS:g} within-run SD (ddof=1): " + "; ".join(parts)
    )
    return text, combine(verdicts)


def _dense_stage(sd: SuiteData, g: str) -> Verdict | None:
    mins = sd.metric(g, lambda r: r["dynamics"]["stages"]["min_sparsity"])
    if not mins:
        return None
    return _compare(mins, 0.1, "lowest sparsity (dense would be near 0)", digits=2)


def _rare(r: dict[str, Any]) -> float | None:
    v = [
        x["by_frequency"]["rare_minus_frequent"]
        for x in r["compute"].values()
        if x.get("by_frequency") and x["by_frequency"]["rare_minus_frequent"] is not None
    ]
    return float(np.mean(v)) if v else None


def _rare_more(sd: SuiteData, g: str) -> Verdict | None:
    return _compare(
        sd.metric(g, _rare),
        0.0,
        "active experts, rarest − most frequent fifth of the vocabulary,",
        higher=True,
    )


# PEER's "nearly all experts": usage of at least this share
USAGE_NEARLY_ALL = 0.99


def _usage(sd: SuiteData, g: str) -> Verdict | None:
    vals = sd.metric(g, lambda r: _layer_mean(r, "usage", "usage"))
    if not vals:
        return None
    n_exp = next(
        (
            x.get("num_experts")
            for n in sd.groups[g]
            for x in (sd.analysis.get(n, {}).get("usage") or {}).values()
        ),
        None,
    )
    toks = next((sd.analysis[n].get("eval_tokens") for n in sd.groups[g] if n in sd.analysis), None)
    text, verdict = _compare(vals, USAGE_NEARLY_ALL, "usage", higher=True) or ("", "")
    where = f" of {n_exp:,} experts over {_si(toks)} validation tokens" if n_exp else ""
    return f"usage {_pm(list(vals.values()), 1, pct=True)}{where}; {text}", verdict


def _flip(r: dict[str, Any]) -> float | None:
    """Assignment flip rate, mean over layers: the share of the (token, expert) assignments made
    at either of the last two checkpoints that only one of them made. A token routed to no
    expert at both is no assignment, so a collapsed layer does not look steady."""
    return assignment_flips(r)


def _kl(r: dict[str, Any]) -> float:
    return r["domains"]["mean_kl"]


def _imbalance(r: dict[str, Any]) -> float | None:
    return _layer_mean(r, "load", "imbalance")


def _dead(r: dict[str, Any]) -> float | None:
    return _layer_mean(r, "load", "dead_fraction")


def paper_mini_claims(sd: SuiteData) -> list[tuple[str, str, Verdict | None]]:
    return [
        (
            "ReMoE beats TopK MoE at equal active compute",
            "ReMoE Table 2",
            _at_equal_compute(sd, "remoe", "topk"),
        ),
        (
            "TopK MoE beats dense at equal active compute",
            "both papers",
            _at_equal_compute(sd, "topk", "dense"),
        ),
        ("ReMoE beats dense", "ReMoE Table 2", _beats(sd, "remoe", "dense")),
        ("PEER beats dense", "PEER Fig. 1", _beats(sd, "peer", "dense")),
        (
            "ReMoE's sparsity settles at its target, in every layer",
            "ReMoE §4.4: 0.8751 ± 0.0061 for 0.875",
            _settles(sd, "remoe"),
        ),
        (
            "ReMoE starts with a dense stage (lowest sparsity below 0.1)",
            "ReMoE §4.4, Fig. 3 (stage I)",
            _dense_stage(sd, "remoe"),
        ),
        ("Rarer tokens get more active experts", "ReMoE §5.2, Fig. 6", _rare_more(sd, "remoe")),
        (
            "ReMoE specialises by domain more than TopK",
            "ReMoE §5.3, Fig. 7",
            _compare(
                sd.metric("remoe", _kl),
                sd.metric("topk", _kl),
                "mean KL(domain ‖ all)",
                " nats",
                higher=True,
            ),
        ),
        (
            "ReMoE's routing is steadier than TopK's",
            "ReMoE §5.4",
            _compare(
                sd.metric("remoe", _flip),
                sd.metric("topk", _flip),
                "assignment flip rate between the last two checkpoints",
            ),
        ),
        (
            f"PEER uses (nearly) all of its experts (usage ≥ {USAGE_NEARLY_ALL:.0%})",
            "PEER §3.3",
            _usage(sd, "peer"),
        ),
    ]


def _num_experts(sd: SuiteData, name: str) -> int | None:
    ffn = (RunDir(sd.runs[name].path).raw_config().get("model") or {}).get("ffn") or {}
    return ffn.get("num_experts")


def _by_experts(
    sd: SuiteData, first: str = "topk", second: str = "remoe"
) -> dict[int, tuple[str, str]]:
    """``E → (group of method first, group of method second)``: the groups of a suite paired by
    the number of experts in their runs' configs, the method from their summaries."""
    out: dict[int, dict[str, str]] = {}
    for g, names in sd.groups.items():
        e = _num_experts(sd, names[0]) if names else None
        if e is not None and sd.runs[names[0]].method in (first, second):
            out.setdefault(int(e), {})[sd.runs[names[0]].method] = g
    return {e: (v[first], v[second]) for e, v in sorted(out.items()) if len(v) == 2}


def experts_scaling_claims(sd: SuiteData) -> list[tuple[str, str, Verdict | None]]:
    pairs = _by_experts(sd)
    if not pairs:
        return []
    beats = {
        e: _compare(sd.losses(r), sd.losses(t), "ReMoE vs TopK") for e, (t, r) in pairs.items()
    }
    beat = _per_e({e: v for e, v in beats.items() if v is not None})
    diffs = {
        e: float(np.mean(list(sd.losses(r).values())) - np.mean(list(sd.losses(t).values())))
        for e, (t, r) in pairs.items()
        if sd.losses(t) and sd.losses(r)
    }
    es = sorted(diffs)
    d = [diffs[e] for e in es]
    grows = all(b < a for a, b in zip(d, d[1:], strict=False))
    n = min(len(sd.groups[g]) for p in pairs.values() for g in p)
    lead = (
        f"the difference goes from {d[0]:+.3f} at E={es[0]} to {d[-1]:+.3f} at E={es[-1]}"
        + ("" if grows else ", not monotonically")
        + " (no test across E)",
        (INDICATIVE if n == 1 else "not shown (no test across E)")
        if grows
        else f"not shown ({n} seed{'s' * (n != 1)})",
    )
    flips = {
        e: _compare(sd.metric(r, _flip), sd.metric(t, _flip), "ReMoE vs TopK", digits=2)
        for e, (t, r) in pairs.items()
    }
    flips = {e: v for e, v in flips.items() if v is not None}
    steadier = _per_e(flips) if flips else None
    return [
        ("ReMoE beats TopK (val loss) at every number of experts", "ReMoE Fig. 5", beat),
        ("ReMoE's lead over TopK grows with E", "ReMoE Fig. 5", lead if len(d) > 1 else None),
        (
            "ReMoE's routing is steadier than TopK's (assignment flip rate) at every E",
            "ReMoE §5.4",
            steadier,
        ),
    ]


def load_balance_claims(sd: SuiteData) -> list[tuple[str, str, Verdict | None]]:
    return [
        (
            "Without the balance loss, TopK's load is less even",
            "Switch Transformer; ReMoE Fig. 8",
            _compare(
                sd.metric("topk-balanced", _imbalance),
                sd.metric("topk-unbalanced", _imbalance),
                "max expert share × E, with vs without",
                digits=2,
            ),
        ),
        (
            "ReMoE's load-balanced L1 evens the load compared with plain L1",
            "ReMoE §3.3, Fig. 8",
            _compare(
                sd.metric("remoe-balanced-l1", _imbalance),
                sd.metric("remoe-plain-l1", _imbalance),
                "max expert share × E, balanced vs plain",
                digits=2,
            ),
        ),
    ]


def routers_claims(sd: SuiteData) -> list[tuple[str, str, Verdict | None]]:
    """The suite definition names the paper whose baselines it reruns (``paper``: its name, its
    method's run and the baseline runs); every other routed run is compared with dense under
    "its paper". Dense is the run whose method is dense."""
    paper = SUITES.get(sd.name, {}).get("paper") or {}
    method, baselines = paper.get("method"), list(paper.get("baselines", []))
    dense = next((g for g, ns in sd.groups.items() if sd.runs[ns[0]].method == "dense"), None)
    out: list[tuple[str, str, Verdict | None]] = []
    for g in baselines:
        if g in sd.groups and method in sd.groups:
            out.append(
                (
                    f"{method} beats {g} at equal active compute",
                    paper["name"],
                    _at_equal_compute(sd, method, g),
                )
            )
    for g in sd.groups:
        if dense is not None and g not in (dense, method):
            source = paper["name"] if g in baselines else "its paper"
            out.append((f"{g} beats dense", source, _beats(sd, g, dense)))
    return out
