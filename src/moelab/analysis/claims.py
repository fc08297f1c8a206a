"""Verdicts on the papers' claims, computed from a suite's committed files.

Each rule returns ``(claim, evidence, verdict)``: "yes" when the claim holds on every seed,
"partly" when only on the mean, "no" otherwise, so a rerun that changes an outcome changes the
verdict too."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import numpy as np

from moelab.analysis.suite_data import SuiteData, _layer_mean, _pm, _si

# ----------------------------------------------------------------------------- claims

Verdict = tuple[str, str]  # (evidence, verdict)


def _lower(
    sd: SuiteData,
    a: dict[int, float],
    b: dict[int, float],
    what: str,
    unit: str = "",
    digits: int = 3,
    higher: bool = False,
) -> Verdict | None:
    """Does ``a`` beat ``b`` (lower, or higher with ``higher``)? Paired by seed: "yes" when it
    does on every seed, "partly" when only on the mean, "no" otherwise."""
    seeds = sorted(set(a) & set(b))
    if not seeds:
        return None
    sign = -1.0 if higher else 1.0
    ma, mb = np.mean([a[s] for s in seeds]), np.mean([b[s] for s in seeds])
    wins = sum(sign * (a[s] - b[s]) < 0 for s in seeds)
    text = (
        f"{what} {ma:.{digits}f}{unit} vs {mb:.{digits}f}{unit} "
        f"(difference {ma - mb:+.{digits}f}); better on {wins}/{len(seeds)} seed"
        f"{'s' * (len(seeds) != 1)}"
    )
    verdict = "yes" if wins == len(seeds) else "partly" if sign * (ma - mb) < 0 else "no"
    return text, verdict


def _domains(sd: SuiteData, ga: str, gb: str) -> str:
    doms: dict[str, list[float]] = {}
    for g, sgn in ((ga, 1.0), (gb, -1.0)):
        for n in sd.groups.get(g, []):
            for d, v in sd.runs[n].final_val()["val_loss_by_domain"].items():
                doms.setdefault(d, []).append(sgn * float(v) / len(sd.groups[g]))
    better = sum(sum(v) < 0 for v in doms.values())
    return f", on {better}/{len(doms)} domains" if doms else ""


def _beats(sd: SuiteData, ga: str, gb: str) -> Verdict | None:
    res = _lower(sd, sd.losses(ga), sd.losses(gb), "val loss")
    if res is None:
        return None
    return res[0] + _domains(sd, ga, gb), res[1]


def _settles(sd: SuiteData, g: str) -> Verdict | None:
    stages = [
        sd.analysis.get(n, {}).get("dynamics", {}).get("stages") for n in sd.groups.get(g, [])
    ]
    stages = [s for s in stages if s]
    if not stages:
        return None
    settled = [s for s in stages if s.get("settle_step") is not None]
    target = stages[0]["target"]
    if not settled:
        return f"never settled within ±{stages[0]['tolerance']} of {target:.3f}", "no"
    means = [s["settled_mean"] for s in settled]
    m = float(np.mean(means))
    text = (
        f"S = {_pm(means, 4)} after settling (target {target:.3f}), from step "
        f"{_pm([s['settle_step'] for s in settled], 0)}; settled on {len(settled)}/"
        f"{len(stages)} seeds"
    )
    ok = len(settled) == len(stages) and abs(m - target) <= 0.01
    return text, "yes" if ok else "partly"


def _dense_stage(sd: SuiteData, g: str) -> Verdict | None:
    mins = list(sd.metric(g, lambda r: r["dynamics"]["stages"]["min_sparsity"]).values())
    if not mins:
        return None
    dense = sum(v < 0.1 for v in mins)
    text = (
        f"lowest sparsity {_pm(mins, 2)} (dense would be near 0); below 0.1 on "
        f"{dense}/{len(mins)} seeds"
    )
    return text, "yes" if dense == len(mins) else "partly" if dense else "no"


def _rare_more(sd: SuiteData, g: str) -> Verdict | None:
    def rare(r: dict[str, Any]) -> float | None:
        v = [
            x["by_frequency"]["rare_minus_frequent"]
            for x in r["compute"].values()
            if x.get("by_frequency") and x["by_frequency"]["rare_minus_frequent"] is not None
        ]
        return float(np.mean(v)) if v else None

    vals = list(sd.metric(g, rare).values())
    if not vals:
        return None
    pos = sum(v > 0 for v in vals)
    text = (
        f"rarest − most frequent fifth of the vocabulary: {_pm(vals, 3)} active experts; "
        f"positive on {pos}/{len(vals)} seeds"
    )
    return text, "yes" if pos == len(vals) else "partly" if np.mean(vals) > 0 else "no"


def _usage(sd: SuiteData, g: str) -> Verdict | None:
    vals = list(sd.metric(g, lambda r: _layer_mean(r, "usage", "usage")).values())
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
    m = float(np.mean(vals))
    text = (
        f"usage {_pm(vals, 1, pct=True)} of {n_exp:,} experts over {_si(toks)} validation tokens"
        if n_exp
        else f"usage {_pm(vals, 1, pct=True)}"
    )
    return text, "yes" if m >= 0.99 else "partly" if m >= 0.9 else "no"


def _flip(r: dict[str, Any]) -> float:
    return r["stability"]["mean_token_flip_rate"]


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
            _beats(sd, "remoe", "topk"),
        ),
        (
            "TopK MoE beats dense at equal active compute",
            "both papers",
            _beats(sd, "topk", "dense"),
        ),
        ("ReMoE beats dense", "ReMoE Table 2", _beats(sd, "remoe", "dense")),
        ("PEER beats dense", "PEER Fig. 1", _beats(sd, "peer", "dense")),
        (
            "ReMoE's sparsity settles at its target",
            "ReMoE §4.4: 0.8751 ± 0.0061 for 0.875",
            _settles(sd, "remoe"),
        ),
        (
            "ReMoE starts with a dense stage",
            "ReMoE §4.4, Fig. 3 (stage I)",
            _dense_stage(sd, "remoe"),
        ),
        ("Rarer tokens get more active experts", "ReMoE §5.2, Fig. 6", _rare_more(sd, "remoe")),
        (
            "ReMoE specialises by domain more than TopK",
            "ReMoE §5.3, Fig. 7",
            _lower(
                sd,
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
            _lower(
                sd,
                sd.metric("remoe", _flip),
                sd.metric("topk", _flip),
                "tokens changing experts between the last two checkpoints",
            ),
        ),
        ("PEER uses (nearly) all of its experts", "PEER §3.3", _usage(sd, "peer")),
    ]


def _by_experts(sd: SuiteData) -> dict[int, tuple[str, str]]:
    """``E → (topk group, remoe group)`` of the experts-scaling suite (groups ``<method>-E<E>``)."""
    out: dict[int, dict[str, str]] = {}
    for g in sd.groups:
        m = re.fullmatch(r"(topk|remoe)-E(\d+)", g)
        if m:
            out.setdefault(int(m.group(2)), {})[m.group(1)] = g
    return {e: (v["topk"], v["remoe"]) for e, v in sorted(out.items()) if len(v) == 2}


def experts_scaling_claims(sd: SuiteData) -> list[tuple[str, str, Verdict | None]]:
    pairs = _by_experts(sd)
    if not pairs:
        return []
    diffs = {}
    for e, (t, r) in pairs.items():
        lt, lr = sd.losses(t), sd.losses(r)
        if lt and lr:
            diffs[e] = float(np.mean(list(lr.values())) - np.mean(list(lt.values())))
    wins = [e for e, d in diffs.items() if d < 0]
    beat = (
        "ReMoE − TopK val loss "
        + ", ".join(f"E={e}: {d:+.3f}" for e, d in diffs.items())
        + f"; ReMoE lower at {len(wins)}/{len(diffs)} values of E",
        "yes" if len(wins) == len(diffs) else "partly" if wins else "no",
    )
    es = sorted(diffs)
    d = [diffs[e] for e in es]
    grows = all(b < a for a, b in zip(d, d[1:], strict=False))
    lead = (
        f"the difference goes from {d[0]:+.3f} at E={es[0]} to {d[-1]:+.3f} at E={es[-1]}"
        + ("" if grows else ", not monotonically"),
        "yes" if grows else "partly" if d[-1] < d[0] else "no",
    )
    steadier = []
    for e, (t, r) in pairs.items():
        ft, fr = sd.metric(t, _flip), sd.metric(r, _flip)
        if ft and fr:
            steadier.append((e, np.mean(list(fr.values())), np.mean(list(ft.values()))))
    flips = None
    if steadier:
        n = sum(fr < ft for _, fr, ft in steadier)
        flips = (
            "flip rate ReMoE vs TopK "
            + ", ".join(f"E={e}: {fr:.2f} vs {ft:.2f}" for e, fr, ft in steadier),
            "yes" if n == len(steadier) else "partly" if n else "no",
        )
    return [
        ("ReMoE beats TopK at every number of experts", "ReMoE Fig. 5", beat),
        ("ReMoE's lead over TopK grows with E", "ReMoE Fig. 5", lead if len(d) > 1 else None),
        ("ReMoE's routing is steadier than TopK's at every E", "ReMoE §5.4", flips),
    ]


def load_balance_claims(sd: SuiteData) -> list[tuple[str, str, Verdict | None]]:
    return [
        (
            "Without the balance loss, TopK's load is less even",
            "Switch Transformer; ReMoE Fig. 8",
            _lower(
                sd,
                sd.metric("topk-balanced", _imbalance),
                sd.metric("topk-unbalanced", _imbalance),
                "max expert share × E, with vs without",
                digits=2,
            ),
        ),
        (
            "ReMoE's load-balanced L1 evens the load compared with plain L1",
            "ReMoE §3.3, Fig. 8",
            _lower(
                sd,
                sd.metric("remoe-balanced-l1", _imbalance),
                sd.metric("remoe-plain-l1", _imbalance),
                "max expert share × E, balanced vs plain",
                digits=2,
            ),
        ),
    ]


# ReMoE's Table 2 baselines (182M active parameters, E=8, k=1): every routed method beats dense and
# ReMoE beats every other router.
REMOE_TABLE2_BASELINES = ("topk", "expert_choice", "hash", "sparsemixer", "lory")


def routers_claims(sd: SuiteData) -> list[tuple[str, str, Verdict | None]]:
    out: list[tuple[str, str, Verdict | None]] = []
    for g in REMOE_TABLE2_BASELINES:
        if g in sd.groups and "remoe" in sd.groups:
            out.append(
                (
                    f"ReMoE beats {g} at equal active compute",
                    "ReMoE Table 2",
                    _beats(sd, "remoe", g),
                )
            )
    for g in sd.groups:
        if g not in ("dense", "remoe") and "dense" in sd.groups:
            paper = "ReMoE Table 2" if g in REMOE_TABLE2_BASELINES else "its paper"
            out.append((f"{g} beats dense", paper, _beats(sd, g, "dense")))
    return out


CLAIMS: dict[str, Callable[[SuiteData], list[tuple[str, str, Verdict | None]]]] = {
    "paper-mini": paper_mini_claims,
    "experts-scaling": experts_scaling_claims,
    "load-balance": load_balance_claims,
    "routers": routers_claims,
}
