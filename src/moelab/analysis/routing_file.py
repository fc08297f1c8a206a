"""A run's routing statistics file, ``routing.npz``: the inputs of its per-token analyses.

The analysis pass (:func:`moelab.analysis.report.analyze_run`) runs the model over fixed validation
windows; its numbers (expert load, experts per token and by token frequency, domain shares and
KL, flip rates, usage, top tokens, loss by domain) are pure functions of the collected
:class:`~moelab.analysis.collect.RoutingTrace`. Checkpoints are too large to commit, so this file
keeps what those functions read, compactly, and :func:`load_routing` gives the traces back:
every analysis recomputes its numbers from the file as from the checkpoint pass.

What is stored (``np.savez_compressed``; ``meta`` is a JSON document as bytes):

* per pass: token ids, domain index and per-token loss (float32) of the analysed windows, and the
  training-split count of every vocabulary id (the frequency bins of the ``compute`` analysis);
* per analysed checkpoint and routed layer: per-expert load, gate mass z' (float64) and distinct
  experts per batch; for layers that keep flat arrays (at most ``MAX_FLAT_EXPERTS`` experts) the
  assignments in CSR form, sorted stably by token: experts per token (the CSR row lengths) and
  the expert ids, as the smallest unsigned integer type that holds them; experts per token of
  the other layers (and of layers whose decisions run several passes per token);
* for the first :data:`WEIGHT_LAYERS` layers with a top-tokens table (at most 64 experts; the
  report and the committed ``analysis.json`` show that layer's table only), the summed gate
  weight (float64) and count of every (expert, vocabulary id) pair
  (:func:`moelab.analysis.stats.token_weight_sums`): what that table is computed from, and a
  fraction of the size of the per-assignment weights (ReMoE's first layers make about three
  assignments per token). Every number recomputed from the file is the checkpoint pass's
  exactly;
* the previous checkpoint's assignments (flat layers only): what the ``stability`` flip rate
  compares.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from moelab.analysis import stats
from moelab.analysis.collect import LayerTrace, RoutingTrace

FORMAT = 1
WEIGHT_LAYERS = 1  # layers whose gate weights are kept (the top-tokens table the report shows)
WEIGHT_MAX_EXPERTS = 64  # analyses.top_tokens' default: larger layers have no table


@dataclass
class RoutingFile:
    """What :func:`load_routing` reads: the analysed checkpoint's trace (no gate weights), the
    previous checkpoint's (None when the pass compared none), training-split counts per
    vocabulary id, the gate-weight sums of the top-tokens layers (``layer → (expert_P, id_P,
    count_P, wsum_P)``) and the meta document (settings, checkpoints, vocabulary, tokenizer)."""

    trace: RoutingTrace
    previous: RoutingTrace | None
    train_counts_V: np.ndarray | None
    weight_sums: dict[str, tuple[np.ndarray, ...]] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def checkpoints(self) -> list[str]:
        return list(self.meta.get("checkpoints") or [])


def _uint(a: np.ndarray) -> np.ndarray:
    """``a`` (non-negative integers) in the smallest unsigned type that holds its maximum."""
    a = np.asarray(a)
    top = int(a.max()) if a.size else 0
    for t in (np.uint8, np.uint16, np.uint32):
        if top <= np.iinfo(t).max:
            return a.astype(t)
    return a.astype(np.uint64)


def weight_layers(trace: RoutingTrace) -> list[str]:
    """The layers whose gate-weight sums are stored: the first :data:`WEIGHT_LAYERS` that keep flat
    arrays and have a top-tokens table (at most :data:`WEIGHT_MAX_EXPERTS` experts)."""
    ok = [
        n for n, lt in trace.layers.items() if lt.has_flat and lt.num_experts <= WEIGHT_MAX_EXPERTS
    ]
    return ok[:WEIGHT_LAYERS]


def _layer_arrays(
    lt: LayerTrace, ids_T: np.ndarray, prefix: str, *, aggregates: bool, weights: bool
) -> dict[str, np.ndarray]:
    T = int(ids_T.size)
    out: dict[str, np.ndarray] = {}
    count = None
    if lt.has_flat:
        order = np.argsort(lt.token_idx_N, kind="stable")
        count = np.bincount(lt.token_idx_N, minlength=T)
        out[prefix + "count"] = _uint(count)
        out[prefix + "experts"] = _uint(lt.expert_idx_N[order])
        if weights:
            e, i, c, w = stats.token_weight_sums(
                ids_T, lt.token_idx_N, lt.expert_idx_N, lt.weight_N, lt.num_experts
            )
            out |= {prefix + "pair_expert": _uint(e), prefix + "pair_id": _uint(i)}
            out |= {prefix + "pair_count": _uint(c), prefix + "pair_wsum": w}
    if aggregates:
        out[prefix + "load"] = _uint(lt.load_E)
        out[prefix + "zprime"] = np.asarray(lt.z_prime_E, np.float64)
        out[prefix + "distinct"] = _uint(np.asarray(lt.distinct_per_batch, np.int64))
        act = lt.active_T if lt.active_T is not None else np.zeros(0, np.int32)
        if count is None or act.shape != count.shape or not np.array_equal(act, count):
            out[prefix + "active"] = _uint(act)
    return out


def save_routing(
    path: str | Path,
    trace: RoutingTrace,
    previous: RoutingTrace | None = None,
    *,
    train_counts_V: np.ndarray | None = None,
    meta: dict[str, Any] | None = None,
) -> Path:
    """Write ``trace`` (the analysed checkpoint), ``previous`` (the one the flip rate compares
    it with) and the training-split counts to ``path`` (written whole or not at all: a temporary
    file renamed into place). ``meta`` (JSON-able: settings, checkpoint names, vocabulary size,
    tokenizer id) is stored beside them. Returns the path."""
    path = Path(path)
    if previous is not None and not np.array_equal(previous.token_ids_T, trace.token_ids_T):
        raise ValueError("save_routing: the two traces were not collected on the same tokens")
    ids_T = trace.token_ids_T
    names = list(trace.layers)
    with_w = set(weight_layers(trace))
    arrays: dict[str, np.ndarray] = {
        "token_ids": _uint(trace.token_ids_T),
        "domain": _uint(trace.domain_T),
        "loss": np.asarray(trace.loss_T, np.float32),
    }
    if train_counts_V is not None:
        arrays["train_counts"] = _uint(train_counts_V)
    layers = []
    for i, name in enumerate(names):
        lt = trace.layers[name]
        layers.append({"name": name, "kind": lt.kind, "num_experts": lt.num_experts})
        arrays |= _layer_arrays(lt, ids_T, f"c0_l{i}_", aggregates=True, weights=name in with_w)
        if previous is not None and lt.has_flat:
            lp = previous.layers.get(name)
            if lp is None or lp.num_experts != lt.num_experts or not lp.has_flat:
                raise ValueError(f"save_routing: layer {name} differs between the two traces")
            arrays |= _layer_arrays(lp, ids_T, f"c1_l{i}_", aggregates=False, weights=False)
    doc = {
        **(meta or {}),
        "format": FORMAT,
        "domains": trace.domains,
        "layers": layers,
        "weight_layers": [n for n in names if n in with_w],
        "has_previous": previous is not None,
    }
    arrays["meta"] = np.frombuffer(json.dumps(doc).encode("utf-8"), np.uint8)
    tmp = path.with_name(f".tmp-{path.name}")
    with open(tmp, "wb") as fh:
        np.savez_compressed(fh, **arrays)
    os.replace(tmp, path)
    return path


def _layer(z: Any, prefix: str, info: dict[str, Any], T: int, full: bool) -> LayerTrace:
    E = int(info["num_experts"])
    lt = LayerTrace(
        name=info["name"],
        kind=info["kind"],
        num_experts=E,
        load_E=np.zeros(E, np.int64),
        z_prime_E=np.zeros(E, np.float64),
    )
    if prefix + "count" in z:
        count = z[prefix + "count"].astype(np.int64)
        lt.token_idx_N = np.repeat(np.arange(T, dtype=np.int64), count)
        lt.expert_idx_N = z[prefix + "experts"].astype(np.int32)
        lt.active_T = count.astype(np.int32)
    if full:
        lt.load_E = z[prefix + "load"].astype(np.int64)
        lt.z_prime_E = z[prefix + "zprime"].astype(np.float64)
        lt.distinct_per_batch = [int(x) for x in z[prefix + "distinct"]]
        if prefix + "active" in z:
            lt.active_T = z[prefix + "active"].astype(np.int32)
    elif lt.expert_idx_N is not None:  # a compared checkpoint keeps assignments only
        lt.load_E = np.bincount(lt.expert_idx_N, minlength=E).astype(np.int64)
    return lt


def load_routing(path: str | Path) -> RoutingFile:
    """Read a file :func:`save_routing` wrote; ValueError naming it when it is not one (or is
    of a newer format). Layers that kept no flat arrays come back with aggregates only; no layer
    has per-assignment gate weights (``weight_N``), the top-tokens layers have their sums."""
    path = Path(path)
    try:
        z = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as err:
        raise ValueError(f"{path}: not a routing statistics file ({err})") from None
    with z:
        try:
            meta = json.loads(bytes(z["meta"]).decode("utf-8"))
        except (KeyError, ValueError) as err:
            raise ValueError(f"{path}: not a routing statistics file ({err})") from None
        if meta.get("format") != FORMAT:
            raise ValueError(
                f"{path}: routing file format {meta.get('format')}; this code reads {FORMAT}"
            )
        ids = z["token_ids"].astype(np.int64)
        T = int(ids.size)

        def trace(c: str, full: bool) -> RoutingTrace:
            layers = {
                info["name"]: _layer(z, f"{c}_l{i}_", info, T, full)
                for i, info in enumerate(meta["layers"])
            }
            return RoutingTrace(
                token_ids_T=ids,
                domain_T=z["domain"].astype(np.int64),
                loss_T=z["loss"].astype(np.float32),
                layers=layers,
                domains=list(meta["domains"]),
            )

        current = trace("c0", True)
        previous = trace("c1", False) if meta.get("has_previous") else None
        counts = z["train_counts"].astype(np.int64) if "train_counts" in z else None
        sums = {}
        for i, info in enumerate(meta["layers"]):
            p = f"c0_l{i}_pair_"
            if p + "wsum" in z:
                fields = ("expert", "id", "count", "wsum")
                sums[info["name"]] = tuple(
                    z[p + f].astype(np.float64 if f == "wsum" else np.int64) for f in fields
                )
    return RoutingFile(current, previous, counts, sums, meta)
