"""The papers' analyses, each a function of collected arrays returning plain (JSON-able) dicts.

* :func:`dynamics` - ReMoE's training dynamics from ``metrics.jsonl`` (stages, settled sparsity).
* :func:`expert_load_analysis` - tokens per expert per layer, nearly-dead experts.
* :func:`dynamic_compute` - active experts per token, per layer and by token frequency.
* :func:`domain_analysis` - routed-token share per expert per domain, mean KL summary.
* :func:`stability` - flip rate between two traces on the same tokens.
* :func:`usage_analysis` - PEER/PKM usage, unevenness, distinct experts per batch.
* :func:`top_tokens` - tokens routed with the highest gate weight, per expert.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from moelab.analysis import stats
from moelab.analysis.collect import RoutingTrace
from moelab.analysis.runs import TrainingCurves

ANALYSES = ("dynamics", "load", "compute", "domains", "stability", "usage", "top-tokens")


def _clean(x: Any) -> Any:
    """NaN/inf → None so results dump as strict JSON."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _clean(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_clean(v) for v in x]
    if isinstance(x, np.generic):
        return _clean(x.item())
    return x


def dynamics(
    curves: TrainingCurves, target: float | None, tolerance: float = 0.03, collapse_at: float = 0.98
) -> dict:
    """Training dynamics: final LM loss, aux losses, and for ReMoE runs the three stages, the
    settling step, settled sparsity mean ± within-run SD (ddof=1) vs target, per layer too, and
    the layers whose sparsity averaged ``>= collapse_at`` over the last five logged steps
    (collapsed layers)."""
    out: dict[str, Any] = {
        "steps": int(curves.steps[-1]) if curves.steps.size else 0,
        "final_loss": float(curves.loss[-1]) if curves.loss.size else float("nan"),
        "final_aux": {k: float(v[-1]) for k, v in curves.aux.items() if v.size},
    }
    if target is not None and curves.has_sparsity:
        st = stats.detect_sparsity_stages(curves.steps, curves.sparsity, target, tolerance)
        out["stages"] = st.as_dict()
        per_layer = {}
        for lk, s in curves.layer_sparsity.items():
            if st.settle_step is not None:
                tail = s[(curves.steps >= st.settle_step) & np.isfinite(s)]
                per_layer[lk] = {
                    "mean": float(tail.mean()) if tail.size else float("nan"),
                    # within-run spread: sample SD (ddof=1) over the logged steps
                    "std": float(tail.std(ddof=1)) if tail.size >= 2 else float("nan"),
                }
            else:
                per_layer[lk] = {"final": float(s[np.isfinite(s)][-1])}
        out["layer_sparsity"] = per_layer
        # one shared λ holds the *average* at the target and can drive one layer to ~100% sparsity
        out["collapsed_layers"] = [
            lk for lk, s in curves.layer_sparsity.items() if np.nanmean(s[-5:]) >= collapse_at
        ]
    return _clean(out)


def expert_load_analysis(trace: RoutingTrace) -> dict:
    """Per layer: share of assignments per expert, nearly-dead fraction (< 1/(8E)), imbalance."""
    out = {}
    for name, lt in trace.layers.items():
        out[name] = {
            "kind": lt.kind,
            "num_experts": lt.num_experts,
            "dead_fraction": stats.dead_expert_fraction(lt.load_E),
            "imbalance": stats.load_imbalance(lt.load_E),
            "load_fraction": stats.load_fractions(lt.load_E).tolist()
            if lt.num_experts <= 1024
            else None,
        }
    return _clean(out)


def training_load(tokens_per_expert: dict[str, list[int]]) -> dict:
    """Expert load from the trainer's last logged ``tokens_per_expert`` per layer (used when no
    checkpoint is available for a validation pass)."""
    out = {}
    for name, counts in tokens_per_expert.items():
        load = np.asarray(counts, dtype=np.int64)
        out[name] = {
            "kind": "logged",
            "num_experts": int(load.size),
            "dead_fraction": stats.dead_expert_fraction(load),
            "imbalance": stats.load_imbalance(load),
            "load_fraction": stats.load_fractions(load).tolist() if load.size <= 1024 else None,
        }
    return _clean(out)


def dynamic_compute(
    trace: RoutingTrace, train_counts_V: np.ndarray | None = None, num_bins: int = 5
) -> dict:
    """Active experts per token per layer (mean, min, max, share of tokens with none) and, given
    training-token counts, its relation to token frequency (ReMoE Fig. 6)."""
    out: dict[str, Any] = {}
    for name, lt in trace.layers.items():
        a = lt.active_T if lt.active_T is not None else np.zeros(0)
        row: dict[str, Any] = {
            "kind": lt.kind,
            "mean": float(a.mean()) if a.size else float("nan"),
            "min": int(a.min()) if a.size else 0,
            "max": int(a.max()) if a.size else 0,
            "no_expert_fraction": float((a == 0).mean()) if a.size else float("nan"),
            "histogram": np.bincount(a).tolist() if a.size and a.max() <= 256 else None,
        }
        if train_counts_V is not None and a.size:
            row["by_frequency"] = stats.active_by_frequency(
                trace.token_ids_T, a, train_counts_V, num_bins
            )
        out[name] = row
    return _clean(out)


def domain_analysis(trace: RoutingTrace) -> dict:
    """Per layer: routed-token share per expert per domain ``[M, E]`` and the mean over domains of
    KL(domain ‖ all domains); ``summary`` averages the KL over layers."""
    M = len(trace.domains)
    weights = np.bincount(trace.domain_T, minlength=M).astype(np.float64)
    out: dict[str, Any] = {"domains": trace.domains, "layers": {}}
    kls = []
    for name, lt in trace.layers.items():
        if not lt.has_flat or lt.num_experts > 1024:
            continue
        shares = stats.domain_expert_shares(
            lt.token_idx_N, lt.expert_idx_N, trace.domain_T, lt.num_experts, M
        )
        kl = stats.domain_specialisation(shares, weights)
        kls.append(kl)
        out["layers"][name] = {"shares": shares.tolist(), "mean_kl": kl}
    out["mean_kl"] = float(np.mean(kls)) if kls else float("nan")
    return _clean(out)


def stability(trace_a: RoutingTrace, trace_b: RoutingTrace) -> dict:
    """Flip rates per layer between two traces of the same tokens (two checkpoints of one run):
    the assignment flip rate per layer and its mean over layers (the reports' flip rate), and
    the token flip rate over routed tokens (:func:`moelab.analysis.stats.flip_rate`)."""
    if not np.array_equal(trace_a.token_ids_T, trace_b.token_ids_T):
        raise ValueError("stability: the two traces were not collected on the same tokens")
    out, skipped = {}, []
    for name, la in trace_a.layers.items():
        lb = trace_b.layers.get(name)
        if lb is None or lb.num_experts != la.num_experts:
            raise ValueError(f"stability: layer {name} differs between the two checkpoints")
        if not (la.has_flat and lb.has_flat):  # aggregates only (e.g. PEER's many experts)
            skipped.append(name)
            continue
        out[name] = stats.flip_rate(
            la.token_idx_N,
            la.expert_idx_N,
            lb.token_idx_N,
            lb.expert_idx_N,
            trace_a.num_tokens,
            la.num_experts,
        )
    rates = [v["token_flip_rate"] for v in out.values()]
    assign = [v["assignment_flip_rate"] for v in out.values()]
    return _clean(
        {
            "layers": out,
            "mean_token_flip_rate": float(np.mean(rates)) if rates else None,
            # the reports' flip rate: defined on assignments, per layer, then averaged
            "mean_assignment_flip_rate": float(np.mean(assign)) if assign else None,
            # no per-assignment arrays kept for these (collect with store_flat=True)
            "skipped_layers": skipped,
        }
    )


def usage_analysis(trace: RoutingTrace) -> dict:
    """PEER §3.3 per layer: usage (share of experts with z' ≠ 0), unevenness, distinct experts hit
    per batch (mean) - reported for every routed layer, most telling for PEER/PKM."""
    out = {}
    for name, lt in trace.layers.items():
        usage, uneven = stats.usage_unevenness(lt.z_prime_E)
        d = lt.distinct_per_batch
        out[name] = {
            "kind": lt.kind,
            "num_experts": lt.num_experts,
            "usage": usage,
            "unevenness": uneven,
            "max_unevenness": math.log(lt.num_experts),
            "distinct_per_batch_mean": float(np.mean(d)) if d else float("nan"),
            "distinct_per_batch_fraction": (
                float(np.mean(d)) / lt.num_experts if d else float("nan")
            ),
        }
    return _clean(out)


def top_tokens(
    trace: RoutingTrace,
    decode: Any = None,
    k: int = 8,
    max_experts: int = 64,
    sums: dict[str, tuple[np.ndarray, ...]] | None = None,
) -> dict:
    """Per layer and expert: the vocabulary ids routed with the highest mean gate weight
    (decoded with ``decode(list[int]) -> str`` when given). Layers with more than
    ``max_experts`` experts are skipped (a million singleton experts do not fit a table).
    A layer without gate weights in the trace uses its :func:`stats.token_weight_sums` from
    ``sums`` (a routing statistics file's), or is left out."""
    out: dict[str, Any] = {}
    for name, lt in trace.layers.items():
        if not lt.has_flat or lt.num_experts > max_experts:
            continue
        if lt.weight_N is not None:
            pairs = stats.token_weight_sums(
                trace.token_ids_T, lt.token_idx_N, lt.expert_idx_N, lt.weight_N, lt.num_experts
            )
        elif sums and name in sums:
            pairs = sums[name]
        else:
            continue
        tops = stats.top_tokens_from_sums(*pairs, lt.num_experts, k)
        out[name] = [
            [
                {"id": t, "text": decode([t]) if decode else str(t), "weight": w, "count": c}
                for t, w, c in row
            ]
            for row in tops
        ]
    return _clean(out)


def loss_by_domain(trace: RoutingTrace) -> dict[str, float]:
    """Mean per-token validation loss of each domain, from the same pass."""
    out = {}
    for i, d in enumerate(trace.domains):
        sel = trace.domain_T == i
        if sel.any():
            out[d] = float(trace.loss_T[sel].mean())
    return out
