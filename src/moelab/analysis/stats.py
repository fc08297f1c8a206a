"""Routing statistics as pure functions of plain arrays (numpy), so each is testable by hand.

Every function here takes arrays that :mod:`moelab.analysis.collect` gathered from the routing
decisions the layers themselves made (through ``routing_observer``) or that the trainer logged in
``metrics.jsonl``; nothing here recomputes routing. Shape legend as in :mod:`moelab.layers.base`:
T tokens, E experts, N flat (token, expert) assignments, V vocabulary, M domains.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from moelab.layers.usage import usage_and_unevenness

# ----------------------------------------------------------------------------- training dynamics


@dataclass(frozen=True)
class SparsityStages:
    """ReMoE's three training stages located on a sparsity curve (arXiv 2412.14711, §4.4, Fig. 3).

    Stage I (dense, ``steps[0] .. dense_end``): the L1 term is negligible, so the router turns
    almost every expert on. Stage II (sparsifying, ``dense_end .. settle_step``): λ grows
    geometrically and sparsity climbs to the target. Stage III (stable, ``settle_step ..``):
    the controller holds sparsity at the target. ``settle_step`` is None when the curve never
    settles (stage III absent); ``dense_end`` is None when the curve has no points.
    """

    target: float
    tolerance: float
    dense_end: int | None
    settle_step: int | None
    settled_mean: float
    settled_std: float
    min_sparsity: float

    def stage_of(self, step: int) -> str:
        """``"dense"``, ``"sparsifying"`` or ``"stable"`` for a step."""
        if self.settle_step is not None and step >= self.settle_step:
            return "stable"
        if self.dense_end is not None and step <= self.dense_end:
            return "dense"
        return "sparsifying"

    def as_dict(self) -> dict[str, float | int | None]:
        return {
            "target": self.target,
            "tolerance": self.tolerance,
            "dense_end": self.dense_end,
            "settle_step": self.settle_step,
            "settled_mean": self.settled_mean,
            "settled_std": self.settled_std,
            "min_sparsity": self.min_sparsity,
        }


def settle_index(sparsity: np.ndarray, target: float, tolerance: float) -> int | None:
    """Index of the first point after which ``|S − S*| <= tolerance`` holds for every later point
    (ReMoE's stage III starts there); None if the last point is outside the band."""
    s = np.asarray(sparsity, dtype=np.float64)
    if s.size == 0:
        return None
    outside = np.nonzero(np.abs(s - target) > tolerance)[0]
    if outside.size == 0:
        return 0
    last_out = int(outside[-1])
    return None if last_out == s.size - 1 else last_out + 1


def detect_sparsity_stages(
    steps: np.ndarray,
    sparsity: np.ndarray,
    target: float,
    tolerance: float = 0.03,
    rise_fraction: float = 0.1,
) -> SparsityStages:
    """Locate ReMoE's dense / sparsifying / stable stages (arXiv 2412.14711, §4.4) on a curve.

    * settling step: the first step from which sparsity stays within ``tolerance`` of the target
      for the rest of the run (:func:`settle_index`).
    * end of the dense stage: before settling, sparsity first falls to its minimum ``S_min``
      (ReLU routers start near 0.5 and the LM loss turns experts on); stage I ends at the last
      step before the curve has climbed ``rise_fraction`` of the way from ``S_min`` to the target.
    * the settled sparsity mean ± its within-run sample SD (ddof=1) over the logged steps of
      stage III (the paper reports 0.8751 ± 0.0061 for a target of 0.875, E=8, k=1).
    """
    steps = np.asarray(steps)
    s = np.asarray(sparsity, dtype=np.float64)
    if steps.shape != s.shape:
        raise ValueError(f"steps {steps.shape} and sparsity {s.shape} must have the same shape")
    finite = np.isfinite(s)
    steps, s = steps[finite], s[finite]
    if s.size == 0:
        nan = float("nan")
        return SparsityStages(target, tolerance, None, None, nan, nan, nan)
    i_settle = settle_index(s, target, tolerance)
    head = s[: i_settle if i_settle else s.size] if i_settle != 0 else s[:1]
    i_min = int(np.argmin(head))
    s_min = float(head[i_min])
    rise_level = s_min + rise_fraction * (target - s_min)
    risen = np.nonzero(head[i_min:] > rise_level)[0]
    i_dense_end = i_min + int(risen[0]) - 1 if risen.size else head.size - 1
    i_dense_end = max(i_dense_end, i_min)
    if i_settle is not None:
        tail = s[i_settle:]
        mean = float(tail.mean())
        std = float(tail.std(ddof=1)) if tail.size >= 2 else float("nan")
    else:
        mean = std = float("nan")
    return SparsityStages(
        target=float(target),
        tolerance=float(tolerance),
        dense_end=int(steps[i_dense_end]),
        settle_step=None if i_settle is None else int(steps[i_settle]),
        settled_mean=mean,
        settled_std=std,
        min_sparsity=s_min,
    )


# ----------------------------------------------------------------------------- expert load


def expert_load(expert_idx_N: np.ndarray, num_experts: int) -> np.ndarray:
    """Assignments per expert (``[E]`` int64): how many (token, expert) pairs each expert got."""
    e = np.asarray(expert_idx_N, dtype=np.int64)
    if e.size and (e.min() < 0 or e.max() >= num_experts):
        raise ValueError(f"expert ids must lie in [0, {num_experts}), got [{e.min()}, {e.max()}]")
    return np.bincount(e, minlength=num_experts).astype(np.int64)


def load_fractions(load_E: np.ndarray) -> np.ndarray:
    """Share of a layer's assignments that each expert received (sums to 1; zeros if empty)."""
    load = np.asarray(load_E, dtype=np.float64)
    total = load.sum()
    return load / total if total > 0 else np.zeros_like(load)


def dead_expert_fraction(load_E: np.ndarray, threshold: float | None = None) -> float:
    """Fraction of experts that are nearly dead: they received less than ``threshold`` of the
    layer's assignments (default ``1/(8E)``, an eighth of the balanced share ``1/E``)."""
    load = np.asarray(load_E, dtype=np.float64)
    E = load.size
    if E == 0:
        return float("nan")
    thr = 1.0 / (8 * E) if threshold is None else threshold
    return float((load_fractions(load) < thr).sum() / E)


def load_imbalance(load_E: np.ndarray) -> float:
    """``max_e f_e · E``: 1.0 when perfectly balanced, E when one expert takes everything."""
    f = load_fractions(load_E)
    return float(f.max() * f.size) if f.size and f.sum() > 0 else float("nan")


# ----------------------------------------------------------------------------- dynamic compute


def active_experts_per_token(token_idx_N: np.ndarray, num_tokens: int) -> np.ndarray:
    """Experts each token activated (``[T]`` int64); 0 for a token that kept only the residual
    path (possible with ReLU routing)."""
    return np.bincount(np.asarray(token_idx_N, dtype=np.int64), minlength=num_tokens)


def frequency_bins(counts_V: np.ndarray, num_bins: int = 5) -> np.ndarray:
    """Bin each vocabulary id by training-frequency rank into ``num_bins`` groups holding equal
    shares of the *occurring* vocabulary (0 = rarest … num_bins−1 = most frequent; −1 = unseen)."""
    counts = np.asarray(counts_V, dtype=np.int64)
    bins = np.full(counts.shape, -1, dtype=np.int64)
    seen = np.nonzero(counts > 0)[0]
    if seen.size == 0:
        return bins
    order = seen[np.argsort(counts[seen], kind="stable")]  # rare → frequent
    bins[order] = (np.arange(order.size) * num_bins) // order.size
    return bins


def active_by_frequency(
    token_ids_T: np.ndarray,
    active_T: np.ndarray,
    counts_V: np.ndarray,
    num_bins: int = 5,
) -> dict[str, list[float] | float]:
    """Mean active experts per token in training-frequency bins (ReMoE §5.2, Fig. 6: rarer tokens
    get more experts). Returns ``bin_mean`` (rare → frequent; NaN for an empty bin),
    ``bin_tokens``, ``bin_max_count`` (largest training count in each bin), and
    ``rare_minus_frequent`` (first minus last non-empty bin). Tokens never seen in training form
    no bin and are left out."""
    ids = np.asarray(token_ids_T, dtype=np.int64)
    active = np.asarray(active_T, dtype=np.float64)
    counts = np.asarray(counts_V, dtype=np.int64)
    if ids.shape != active.shape:
        raise ValueError(f"token ids {ids.shape} and active counts {active.shape} differ in shape")
    if ids.size and ids.max() >= counts.size:
        raise ValueError(f"token id {ids.max()} outside the frequency table of {counts.size} ids")
    b = frequency_bins(counts, num_bins)[ids]
    means, sizes, max_count = [], [], []
    bins_V = frequency_bins(counts, num_bins)
    for i in range(num_bins):
        sel = b == i
        sizes.append(int(sel.sum()))
        means.append(float(active[sel].mean()) if sel.any() else float("nan"))
        in_bin = counts[bins_V == i]
        max_count.append(float(in_bin.max()) if in_bin.size else float("nan"))
    finite = [m for m in means if math.isfinite(m)]
    diff = finite[0] - finite[-1] if len(finite) >= 2 else float("nan")
    return {
        "bin_mean": means,
        "bin_tokens": sizes,
        "bin_max_count": max_count,
        "rare_minus_frequent": diff,
    }


# ----------------------------------------------------------------------------- domains


def domain_expert_shares(
    token_idx_N: np.ndarray,
    expert_idx_N: np.ndarray,
    domain_T: np.ndarray,
    num_experts: int,
    num_domains: int,
) -> np.ndarray:
    """Routed-token share per expert per domain, ``[M, E]``, each row summing to 1 (ReMoE §5.3,
    Fig. 7): of the assignments made for tokens of domain m, the fraction that went to expert e.
    A domain with no tokens gets a row of zeros."""
    d_N = np.asarray(domain_T, dtype=np.int64)[np.asarray(token_idx_N, dtype=np.int64)]
    e_N = np.asarray(expert_idx_N, dtype=np.int64)
    counts = np.zeros((num_domains, num_experts), dtype=np.float64)
    np.add.at(counts, (d_N, e_N), 1.0)
    totals = counts.sum(axis=1, keepdims=True)
    return np.divide(counts, totals, out=np.zeros_like(counts), where=totals > 0)


def kl_divergence(p: np.ndarray, q: np.ndarray) -> float:
    """``KL(p ‖ q) = Σ p log(p/q)`` in nats (0·log 0 = 0; +inf where p > 0 = q)."""
    p = np.asarray(p, dtype=np.float64)
    q = np.asarray(q, dtype=np.float64)
    nz = p > 0
    if np.any(q[nz] <= 0):
        return float("inf")
    return float(np.sum(p[nz] * np.log(p[nz] / q[nz])))


def domain_specialisation(shares_ME: np.ndarray, domain_weights_M: np.ndarray) -> float:
    """Mean over domains of ``KL(p_m ‖ p)``, the divergence of each domain's expert distribution
    ``p_m`` from the all-domain one ``p = Σ_m w_m p_m`` (w = the domains' assignment shares).
    0 means the router ignores the domain; larger means stronger specialisation. Domains with no
    tokens are left out of the mean."""
    shares = np.asarray(shares_ME, dtype=np.float64)
    w = np.asarray(domain_weights_M, dtype=np.float64)
    keep = w > 0
    if not keep.any():
        return float("nan")
    w = w[keep] / w[keep].sum()
    shares = shares[keep]
    overall = (w[:, None] * shares).sum(axis=0)
    return float(np.mean([kl_divergence(p, overall) for p in shares]))


# ----------------------------------------------------------------------------- stability


def flip_rate(
    token_idx_a: np.ndarray,
    expert_idx_a: np.ndarray,
    token_idx_b: np.ndarray,
    expert_idx_b: np.ndarray,
    num_tokens: int,
    num_experts: int,
) -> dict[str, float]:
    """Routing change between two snapshots on the same tokens (ReMoE §5.4: steadier routing).

    ``assignment_flip_rate`` (the reports' flip rate): fraction of the (token, expert) pairs
    active in either snapshot that are active in only one, ``|A Δ B| / |A ∪ B|``.
    ``token_flip_rate``: among the tokens routed to at least one expert in either snapshot, the
    fraction whose set of active experts differs (for top-1 routing, whose expert changed). A
    token routed nowhere in both snapshots made no decision, so it counts in neither: counting it
    as unchanged would make a collapsed layer (most tokens routed nowhere) look steady.
    """
    a = np.unique(np.asarray(token_idx_a, np.int64) * num_experts + np.asarray(expert_idx_a))
    b = np.unique(np.asarray(token_idx_b, np.int64) * num_experts + np.asarray(expert_idx_b))
    sym = np.setxor1d(a, b, assume_unique=True)
    union = np.union1d(a, b).size
    changed_tokens = np.unique(sym // num_experts).size
    routed_tokens = np.unique(np.concatenate([a, b]) // num_experts).size
    return {
        "token_flip_rate": changed_tokens / routed_tokens if routed_tokens else 0.0,
        "assignment_flip_rate": sym.size / union if union else 0.0,
    }


# ----------------------------------------------------------------------------- PEER / PKM


def gate_mass(expert_idx_N: np.ndarray, weight_N: np.ndarray, num_experts: int) -> np.ndarray:
    """PEER §3.3's ``z'_i = Σ_x g_i(x)`` (0 for experts never selected), ``[E]`` float64."""
    return np.bincount(
        np.asarray(expert_idx_N, np.int64),
        weights=np.asarray(weight_N, np.float64),
        minlength=num_experts,
    )


def usage_unevenness(z_prime_E: np.ndarray) -> tuple[float, float]:
    """PEER §3.3 usage and unevenness ``log N + Σ z log z``; delegates to the layer library's
    :func:`moelab.layers.usage.usage_and_unevenness` so there is one formula."""
    return usage_and_unevenness(torch.as_tensor(np.asarray(z_prime_E, dtype=np.float64)))


# ----------------------------------------------------------------------------- top tokens


def token_weight_sums(
    token_ids_T: np.ndarray,
    token_idx_N: np.ndarray,
    expert_idx_N: np.ndarray,
    weight_N: np.ndarray,
    num_experts: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``(expert_P, id_P, count_P, wsum_P)``: every (expert, vocabulary id) pair routed at least
    once, ordered by expert then id, with its number of assignments and their summed gate weight
    (float64): all :func:`top_tokens_from_sums` reads, far smaller than the weights themselves."""
    ids_N = np.asarray(token_ids_T, np.int64)[np.asarray(token_idx_N, np.int64)]
    e_N = np.asarray(expert_idx_N, np.int64)
    w_N = np.asarray(weight_N, np.float64)
    parts: list[tuple[np.ndarray, ...]] = []
    for e in range(num_experts):
        sel = e_N == e
        uniq, inv, cnt = np.unique(ids_N[sel], return_inverse=True, return_counts=True)
        wsum = np.bincount(inv, weights=w_N[sel], minlength=uniq.size)
        parts.append((np.full(uniq.size, e, np.int64), uniq, cnt.astype(np.int64), wsum))
    return tuple(np.concatenate([p[i] for p in parts]) for i in range(4))  # type: ignore[return-value]


def top_tokens_from_sums(
    expert_P: np.ndarray,
    id_P: np.ndarray,
    count_P: np.ndarray,
    wsum_P: np.ndarray,
    num_experts: int,
    k: int = 10,
    min_count: int = 3,
) -> list[list[tuple[int, float, int]]]:
    """:func:`top_tokens_per_expert` from :func:`token_weight_sums`' pairs."""
    out: list[list[tuple[int, float, int]]] = []
    for e in range(num_experts):
        sel = expert_P == e
        if not sel.any():
            out.append([])
            continue
        uniq, cnt = id_P[sel], count_P[sel]
        mean_w = wsum_P[sel] / cnt
        ok = cnt >= min_count
        if ok.sum() < k:
            ok = np.ones_like(ok)
        cand = np.nonzero(ok)[0]
        order = cand[np.lexsort((-cnt[cand], -mean_w[cand]))][:k]
        out.append([(int(uniq[i]), float(mean_w[i]), int(cnt[i])) for i in order])
    return out


def top_tokens_per_expert(
    token_ids_T: np.ndarray,
    token_idx_N: np.ndarray,
    expert_idx_N: np.ndarray,
    weight_N: np.ndarray,
    num_experts: int,
    k: int = 10,
    min_count: int = 3,
) -> list[list[tuple[int, float, int]]]:
    """For each expert, the ``k`` vocabulary ids routed to it with the highest mean gate weight
    (``(token_id, mean_weight, count)``), among ids routed to it at least ``min_count`` times
    (relaxed to 1 for an expert that has too few such ids)."""
    sums = token_weight_sums(token_ids_T, token_idx_N, expert_idx_N, weight_N, num_experts)
    return top_tokens_from_sums(*sums, num_experts, k, min_count)


def mean_std(values: list[float] | np.ndarray) -> tuple[float, float]:
    """Mean and sample SD (ddof=1) over seeds, ignoring NaN; the SD is NaN for a single value,
    both are NaN when nothing is finite."""
    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v)]
    if v.size == 0:
        return float("nan"), float("nan")
    return float(v.mean()), float(v.std(ddof=1)) if v.size >= 2 else float("nan")
