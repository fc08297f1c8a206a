"""A run's per-token analyses from its traces, whichever source they come from: the checkpoint
pass (:func:`moelab.analysis.report.analyze_run`) or the run's routing statistics file
(:mod:`moelab.analysis.routing_file`). One function computes the numbers from both, so a run
whose checkpoints are gone (every run committed under docs/results) gives the numbers its
checkpoint pass gave.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from moelab.analysis import analyses
from moelab.analysis.collect import RoutingTrace
from moelab.analysis.routing_file import load_routing
from moelab.data import load_tokenizer
from moelab.rundir import RunDir

PER_TOKEN = tuple(a for a in analyses.ANALYSES if a != "dynamics")


def per_token_results(
    what: tuple[str, ...] | list[str],
    trace: RoutingTrace,
    previous: RoutingTrace | None,
    *,
    train_counts_V: np.ndarray | None,
    decode: Callable[[list[int]], str] | None,
    checkpoints: list[str],
    weight_sums: dict[str, tuple[np.ndarray, ...]] | None = None,
) -> tuple[dict[str, Any], list[str], dict[str, np.ndarray]]:
    """``(results, notes, z_primes)`` of the analyses in ``what`` on ``trace``; ``previous`` is
    the trace of the checkpoint the flip rate compares with (None: stability is left out), and
    ``checkpoints`` their names (previous first). Top tokens come from the layers whose gate
    weights the trace holds, or whose sums ``weight_sums`` holds (a routing file's)."""
    res: dict[str, Any] = {
        "eval_tokens": trace.num_tokens,
        "eval_loss_by_domain": analyses.loss_by_domain(trace),
        "eval_loss": float(trace.loss_T.mean()) if trace.num_tokens else None,
    }
    if not trace.layers:
        return res, ["no routed layers: routing analyses do not apply"], {}
    z_primes: dict[str, np.ndarray] = {}
    if "load" in what:
        res["load"] = analyses.expert_load_analysis(trace)
    if "compute" in what:
        res["compute"] = analyses.dynamic_compute(trace, train_counts_V)
    if "domains" in what:
        res["domains"] = analyses.domain_analysis(trace)
    if "usage" in what:
        res["usage"] = analyses.usage_analysis(trace)
        z_primes = {k: lt.z_prime_E for k, lt in trace.layers.items()}
    if "top-tokens" in what:
        res["top_tokens"] = analyses.top_tokens(trace, decode=decode, sums=weight_sums)
    if "stability" in what and previous is not None:
        res["stability"] = analyses.stability(previous, trace)
        res["stability"]["checkpoints"] = list(checkpoints)
    return res, [], z_primes


def decoder(run_dir: str | Path, tokenizer: str | None) -> Callable[[list[int]], str] | None:
    """The run's tokenizer's ``decode``: its own copy, else the shipped tokenizer when it is the
    one ``tokenizer`` (``sha256:<12 hex>``, as the analysis records it) names; else None."""
    run = RunDir(run_dir)
    if run.has_tokenizer:
        return run.tokenizer().decode
    shipped = load_tokenizer()
    return shipped.decode if tokenizer == f"sha256:{shipped.sha256[:12]}" else None


def results_from_file(
    run_dir: str | Path, what: tuple[str, ...] | list[str]
) -> tuple[dict[str, Any], list[str], dict[str, np.ndarray]]:
    """:func:`per_token_results` of the run's routing statistics file, with the vocabulary and
    tokenizer it records, and one note naming what the file cannot give (those need a
    checkpoint)."""
    path = RunDir(run_dir).path / RunDir.ROUTING
    rf = load_routing(path)
    meta = rf.meta
    tok = meta.get("tokenizer")
    decode = decoder(run_dir, tok) if "top-tokens" in what else None
    res, notes, z = per_token_results(
        what,
        rf.trace,
        rf.previous,
        train_counts_V=rf.train_counts_V,
        decode=decode,
        checkpoints=rf.checkpoints,
        weight_sums=rf.weight_sums,
    )
    res = {"vocab_size": meta.get("vocab_size"), "tokenizer": tok, **res}
    missing = []
    if "stability" in what and rf.previous is None:
        missing.append("stability (the file holds one checkpoint's routing)")
    if "top-tokens" in what and rf.trace.layers:
        kept = set(meta.get("weight_layers") or [])
        rest = [n for n, lt in rf.trace.layers.items() if lt.has_flat and n not in kept]
        if rest:
            missing.append(
                f"top tokens of layers {', '.join(rest)} (gate weights of one layer kept)"
            )
    src = f"per-token analyses from {RunDir.ROUTING} ({', '.join(rf.checkpoints) or '?'})"
    notes.append(src + ("; need a checkpoint: " + "; ".join(missing) if missing else ""))
    return res, notes, z
