"""The claims of ReMoE and PEER judged on the `paper` protocol (dense, TopK, ReMoE with a shared
and with per-layer λ, hash, PEER; ~1M tokens, 3 seeds, each method at its swept learning rate),
and what the `remoe-collapse` suite (one seed, so "indicative" at most) says about the collapsed
layer. Same rule and helpers as :mod:`moelab.analysis.claims`: a paired t-test over matched
seeds, measured compute for every "at equal active compute"."""

from __future__ import annotations

from typing import Any

from moelab.analysis.claims import (
    USAGE_NEARLY_ALL,
    Verdict,
    _at_equal_compute,
    _beats,
    _compare,
    _dense_stage,
    _flip,
    _kl,
    _rare_more,
    _settles,
    _usage,
)
from moelab.analysis.suite_data import SuiteData
from moelab.analysis.verdict import sample_sd

Claims = list[tuple[str, str, Verdict | None]]

REMOE_RUNS = {"remoe": "ReMoE", "remoe-layerwise": "ReMoE (per-layer λ)"}


def paper_claims(sd: SuiteData) -> Claims:
    """ReMoE's ordering (dense > TopK > ReMoE in loss at equal compute), its three stages, its
    per-layer sparsity, specialisation, rare-token compute and steadier routing, for both λ
    schemes; hash (the baseline that tied ReMoE in paper-mini); PEER against dense at equal
    measured compute and its expert usage."""
    out: Claims = [
        (
            "TopK MoE beats dense at equal active compute",
            "both papers",
            _at_equal_compute(sd, "topk", "dense"),
        )
    ]
    for g, name in REMOE_RUNS.items():
        out += [
            (
                f"{name} beats TopK MoE at equal active compute",
                "ReMoE Table 2",
                _at_equal_compute(sd, g, "topk"),
            ),
            (f"{name} beats dense", "ReMoE Table 2", _beats(sd, g, "dense")),
            (f"{name} beats hash routing", "ReMoE Table 2", _at_equal_compute(sd, g, "hash")),
            (
                f"{name} starts with a dense stage (lowest sparsity below 0.1)",
                "ReMoE §4.4, Fig. 3 (stage I)",
                _dense_stage(sd, g),
            ),
            (
                f"{name}'s sparsity settles at its target, in every layer",
                "ReMoE §4.4: 0.8751 ± 0.0061 for 0.875",
                _settles(sd, g),
            ),
            (
                f"{name}: rarer tokens get more active experts",
                "ReMoE §5.2, Fig. 6",
                _rare_more(sd, g),
            ),
            (
                f"{name} specialises by domain more than TopK",
                "ReMoE §5.3, Fig. 7",
                _compare(
                    sd.metric(g, _kl),
                    sd.metric("topk", _kl),
                    "mean KL(domain ‖ all)",
                    " nats",
                    higher=True,
                ),
            ),
            (
                f"{name}'s routing is steadier than TopK's",
                "ReMoE §5.4",
                _compare(
                    sd.metric(g, _flip),
                    sd.metric("topk", _flip),
                    "assignment flip rate between the last two checkpoints",
                ),
            ),
        ]
    out += [
        (
            "PEER beats dense at equal active compute",
            "PEER Fig. 1",
            _at_equal_compute(sd, "peer", "dense"),
        ),
        (
            f"PEER uses (nearly) all of its experts (usage ≥ {USAGE_NEARLY_ALL:.0%})",
            "PEER §3.3",
            _usage(sd, "peer"),
        ),
    ]
    return out


def _last_layer_sparsity(r: dict[str, Any]) -> float | None:
    layers = (r.get("dynamics") or {}).get("layer_sparsity") or {}
    if not layers:
        return None
    last = layers[sorted(layers, key=lambda k: int(k) if str(k).isdigit() else str(k))[-1]]
    return last.get("final")


def remoe_collapse_claims(sd: SuiteData) -> Claims:
    """One seed: what a lower learning rate, a longer warm-up and one λ per layer do to the last
    layer's final sparsity (the collapse: near 1), and to the loss against the preset's run."""
    base = "remoe-lr3e-3"
    out: Claims = []
    for g in sorted(x for x in sd.groups if x.startswith("remoe") and x != base):
        out.append(
            (
                f"{g}: the last layer keeps more of its experts than the preset's run",
                "docs/results/remoe-collapse",
                _compare(
                    sd.metric(g, _last_layer_sparsity),
                    sd.metric(base, _last_layer_sparsity),
                    "last layer's final sparsity",
                ),
            )
        )
    return out


def peer_optim_claims(sd: SuiteData) -> Claims:
    """The row-wise table optimizers against exact lazy AdamW on PEER's tables (paired by seed):
    does either change the final validation loss, and is the change within the seed-to-seed
    spread of the exact optimizer (the sample SD of its final losses over seeds)?"""
    lazy = sd.losses("lazy")
    spread = sample_sd(list(lazy.values())) if len(lazy) > 1 else float("nan")
    out: Claims = []
    for g, name in (("rowwise", "row-wise Adam"), ("rowwise_bf16", "row-wise Adam, bf16 m")):
        for claim, higher in (
            (f"{name} trains PEER's tables to a lower loss", False),
            (f"{name} costs loss against exact AdamW", True),
        ):
            res = _compare(sd.losses(g), lazy, "val loss", higher=higher)
            if res is not None:
                res = (f"{res[0]}; seed SD of exact AdamW {spread:.3f}", res[1])
            out.append((claim, "docs/peer.md (row-wise optimizer state)", res))
    return out
