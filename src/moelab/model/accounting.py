"""Parameter and FLOP accounting: what a model holds, what one token uses, what one token costs.

Conventions (so numbers compare across dense, MoE, PEER and PKM models):

* ``total_params``: every parameter once (a tied LM head shares the embedding table).
* ``active_params``: what one token's forward touches, counting all non-routed parameters
  (embedding table and head included, as MoE papers report "activated parameters";
  ``active_params_non_embedding`` leaves the embedding table and head out). Routed parts:
  - MoE: ``top_k·G`` fine-grained experts of width ``d_hidden/G`` (= ``top_k`` coarse experts) + the
    shared experts + the router. ReLU routing (ReMoE) counts its target ``k`` (sparsity 1 − k/E).
    Where the experts a token runs vary, this ``k`` is a cap or a nominal value, not what a token
    runs (see :func:`accounting`). Router parameters a model holds once (RMoE's GRU, shared over
    depth) count once, in total and active parameters alike; their FLOPs count in every layer.
  - PEER: ``heads·top_k`` singleton experts of ``2·d_model`` parameters (down and up vectors) + the
    query networks (``heads·d_model·d_key``) + query BatchNorm affine parameters.
  - PKM: ``heads·top_k`` value rows of ``d_model`` + the query network + its BatchNorm.
* ``flops_per_token`` (forward): ``2·`` the active *matmul* parameters (embedding lookup and norms
  are not matmuls; the LM head is) + attention scores and weighted sums at ``max_seq_len``
  (``4·max_seq_len·n_heads·head_dim`` per block, the full L×L matrix as Chinchilla counts it; causal
  masking would halve the average) + product-key retrieval (per head: ``2·√N·d_key`` to score both
  sub-key halves, plus the ``top_k²`` candidate sums).

Measured compute: the nominal count above assumes every token runs ``top_k`` experts. A routed
layer records the expert FLOPs it really spent (``RoutingStats.expert_flops``: computed
assignments × ``assignment_flops``); :func:`measured_flops` adds the part that does not depend on
routing (``flops_per_token − routed_flops_per_token`` per token: attention, head, routers,
shared experts) to get a forward's measured FLOPs.

Each FFN kind counts itself (:meth:`moelab.model.ffn_configs.DenseConfig.accounting` and its
siblings); a built model's ``total_params`` are counted from its real parameters.
"""

from __future__ import annotations

from collections import defaultdict

from torch import nn

from moelab.model.config import ModelConfig
from moelab.model.ffn_configs import FFN_KINDS

LAYER_TYPES = ("embeddings", "attention", "norms", *(c.layer_type for c in FFN_KINDS.values()))


def accounting(model_or_cfg: nn.Module | ModelConfig) -> dict:
    """Parameters and forward FLOPs per token of a :class:`TransformerLM` or a :class:`ModelConfig`.

    Returns ``total_params``, ``active_params``, ``active_params_non_embedding``,
    ``flops_per_token``, ``routed_flops_per_token`` (the nominal routed-expert part of it),
    ``routed_layers`` (per routed block: ``assignment_flops``, ``assignments_per_token``) and
    ``by_type``: for each of ``LAYER_TYPES`` present, a dict with
    ``layers``, ``total_params``, ``active_params``, ``flops_per_token``. Given a model, totals
    are its real parameter counts (so custom layer layouts are counted exactly); from a config
    alone they are the same numbers for every registered router (tested).

    The MoE ``active_params`` and ``flops_per_token`` are worked out from the config, before any
    token is routed, with ``top_k`` experts per token per layer (times ``granularity``). That is
    exact where every token runs k experts (``topk``, ``rmoe``, ``hash``, ``sparsemixer``,
    ``aux_free``; ``lory`` counts its one merged expert) and otherwise a planning number, which
    the logged ``active_mean`` (FFN experts a token really ran, per layer) corrects:

    * an upper bound for ``null`` (AdaMoE) and ``moepp`` (MoE++): k is the cap, and a slot given
      to a null or zero-computation expert runs no FFN expert;
    * the target for ``relu`` (ReMoE, sparsity ``1 − k/E``); the mean for ``expert_choice`` at
      ``ec_capacity_factor=1`` (each expert takes ``⌈ec_capacity_factor·k·T/E⌉`` tokens, so a token
      gets 0 to E experts);
    * only nominal for ``top_p``: its experts per token follow ``p`` (1 to ``max_experts``), and k
      plays no part in the choice.

    With a ``capacity_factor`` (assignments over an expert's capacity are dropped) the count is
    an upper bound for every router in training forwards; eval forwards are dropless unless
    ``eval_capacity_factor`` is set.
    """
    model = None if isinstance(model_or_cfg, ModelConfig) else model_or_cfg
    cfg: ModelConfig = model_or_cfg if model is None else model.cfg
    D, V, L = cfg.d_model, cfg.vocab_size, cfg.max_seq_len
    rows: dict[str, dict[str, int]] = defaultdict(
        lambda: {"layers": 0, "total_params": 0, "active_params": 0, "flops_per_token": 0}
    )

    def add(kind: str, total: int, active: int, flops: int, layers: int = 1) -> None:
        row = rows[kind]
        row["layers"] += layers
        row["total_params"] += total
        row["active_params"] += active
        row["flops_per_token"] += flops

    emb = V * D * (1 if cfg.tie_embeddings else 2)
    add("embeddings", emb, emb, 2 * V * D, layers=0)  # only the head is a matmul
    attn_dim, kv_dim = cfg.n_heads * cfg.head_dim, cfg.kv_heads * cfg.head_dim
    attn = 2 * D * attn_dim + 2 * D * kv_dim
    biases = (attn_dim + 2 * kv_dim) if cfg.qkv_bias else 0  # not matmul parameters
    qk_norm = {"none": 0, "full": attn_dim + kv_dim, "head": 2 * cfg.head_dim}[cfg.qk_norm]
    norms = (2 * cfg.n_layers + 1) * D + cfg.n_layers * qk_norm
    add("norms", norms, norms, 0, layers=0)
    routed: list[dict[str, int]] = []  # per routed layer: its nominal expert FLOPs
    held_once: dict[str, int] = {}  # per layer type: parameters the model holds once (RMoE's GRU)
    for i in range(cfg.n_layers):
        add("attention", attn + biases, attn + biases, 2 * attn + 4 * L * attn_dim)
        ffn = cfg.ffn_for(i)
        a = ffn.accounting(D)
        flops = 2 * a["matmul_active"] + a["extra_flops"]
        add(ffn.layer_type, a["total_params"], a["active_params"], flops)
        if "assignment_flops" in a:
            routed.append(
                {
                    "block": i,
                    "assignment_flops": a["assignment_flops"],
                    "assignments_per_token": a["assignments_per_token"],
                }
            )
        if a.get("model_shared_params"):
            held_once[ffn.layer_type] = a["model_shared_params"]
    for kind, n in held_once.items():  # one set of tensors, used by every layer: counted once
        add(kind, n, n, 0, layers=0)

    if model is not None:
        _count_real_totals(model, rows)

    by_type = {k: dict(rows[k]) for k in LAYER_TYPES if k in rows}
    total = sum(r["total_params"] for r in by_type.values())
    active = sum(r["active_params"] for r in by_type.values())
    out = {
        "total_params": total,
        "active_params": active,
        "active_params_non_embedding": active - by_type["embeddings"]["active_params"],
        "flops_per_token": sum(r["flops_per_token"] for r in by_type.values()),
        "routed_flops_per_token": sum(
            r["assignment_flops"] * r["assignments_per_token"] for r in routed
        ),
        "routed_layers": routed,
        "by_type": by_type,
    }
    if model is not None:
        real = sum(p.numel() for p in model.parameters())
        if real != total:  # a module we did not classify: keep the total honest
            out["total_params"] = real
            out["unclassified_params"] = real - total
    return out


def measured_flops(acc: dict, tokens: int, expert_flops: float) -> float:
    """Forward FLOPs of ``tokens`` tokens whose routed layers spent ``expert_flops`` (the sum of
    their ``RoutingStats.expert_flops``): the routing-independent FLOPs per token of
    :func:`accounting` ``acc`` times ``tokens``, plus what the experts really spent."""
    fixed = acc["flops_per_token"] - acc.get("routed_flops_per_token", 0)
    return float(fixed) * tokens + float(expert_flops)


def _count_real_totals(model: nn.Module, rows: dict[str, dict[str, int]]) -> None:
    """Replace the analytic FFN totals by the built layers' own parameter counts."""
    real: dict[str, int] = defaultdict(int)
    seen: set[int] = set()  # parameters shared across blocks (RMoE's GRU) count once
    for i, block in enumerate(model.blocks):
        for p in block.ffn.parameters():
            if id(p) not in seen:
                seen.add(id(p))
                real[model.cfg.ffn_for(i).layer_type] += p.numel()
    for kind, n in real.items():
        rows[kind]["total_params"] = n
