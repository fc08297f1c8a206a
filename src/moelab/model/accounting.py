"""Parameter and FLOP accounting: what a model holds, what one token uses, what one token costs.

Conventions (so numbers compare across dense, MoE, PEER and PKM models):

* ``total_params``: every parameter once (a tied LM head shares the embedding table).
* ``active_params``: what one token's forward touches, counting all non-routed parameters
  (embedding table and head included, as MoE papers report "activated parameters";
  ``active_params_non_embedding`` leaves the embedding table and head out). Routed parts:
  - MoE: ``top_k·G`` fine-grained experts of width ``d_hidden/G`` (= ``top_k`` coarse experts) + the
    shared experts + the router. ReLU routing (ReMoE) counts its target ``k`` (sparsity 1 − k/E).
  - PEER: ``heads·top_k`` singleton experts of ``2·d_model`` parameters (down and up vectors) + the
    query networks (``heads·d_model·d_key``) + query BatchNorm affine parameters.
  - PKM: ``heads·top_k`` value rows of ``d_model`` + the query network + its BatchNorm.
* ``flops_per_token`` (forward): ``2·`` the active *matmul* parameters (embedding lookup and norms
  are not matmuls; the LM head is) + attention scores and weighted sums at ``max_seq_len``
  (``4·max_seq_len·n_heads·head_dim`` per block, the full L×L matrix as Chinchilla counts it; causal
  masking would halve the average) + product-key retrieval (per head: ``2·√N·d_key`` to score both
  sub-key halves, plus the ``top_k²`` candidate sums).

Product-key layouts assumed for a config (a built model's ``total_params`` are counted from its
real parameters instead): PEER shares one set of ``2·√N`` sub-keys of ``d_key/2`` across heads (the
keys index the shared experts); PKM has one set per head (Lample et al. 2019).
"""

from __future__ import annotations

import math
from collections import defaultdict

from torch import nn

from moelab.layers.dense import up_width
from moelab.model.config import FFNConfig, ModelConfig

LAYER_TYPES = ("embeddings", "attention", "norms", "dense_ffn", "moe", "peer", "pkm")


def _ffn_params(d_model: int, d_hidden: int, activation: str) -> int:
    """One (bias-free) FFN: fused up/gate ``[D, up]`` and down ``[F, D]``."""
    return d_model * up_width(d_hidden, activation) + d_hidden * d_model


def ffn_accounting(ffn: FFNConfig, d_model: int) -> dict[str, int]:
    """``total_params``, ``active_params``, ``matmul_active`` and ``extra_flops`` of one resolved
    FFN slot (see the module docstring for what counts)."""
    D = d_model
    if ffn.kind == "dense":
        p = _ffn_params(D, ffn.d_hidden, ffn.activation)
        return {"total_params": p, "active_params": p, "matmul_active": p, "extra_flops": 0}
    if ffn.kind == "moe":
        g = ffn.granularity
        width = ffn.d_hidden // g
        expert = _ffn_params(D, width, ffn.activation)
        router = D * ffn.num_experts * g
        shared = (
            _ffn_params(D, ffn.shared_experts * width, ffn.activation) if ffn.shared_experts else 0
        )
        total = ffn.num_experts * g * expert + router + shared
        active = ffn.top_k * g * expert + router + shared
        return {
            "total_params": total,
            "active_params": active,
            "matmul_active": active,
            "extra_flops": 0,
        }
    h, k, dk = ffn.heads, ffn.top_k, ffn.d_key
    queries = h * D * dk
    bn = 2 * h * dk if ffn.query_batchnorm else 0
    if ffn.kind == "peer":
        n = ffn.num_experts
        keys = math.isqrt(n) * dk  # 2 halves x sqrt(N) sub-keys x d_key/2, shared by the heads
        experts_total, experts_active = n * 2 * D, h * k * 2 * D
    else:  # pkm
        n = ffn.num_memories
        keys = h * math.isqrt(n) * dk  # one set of sub-keys per head
        experts_total, experts_active = n * D, h * k * D
    retrieval = h * (2 * math.isqrt(n) * dk + k * k)
    return {
        "total_params": experts_total + queries + bn + keys,
        "active_params": experts_active + queries + bn,
        "matmul_active": experts_active + queries,
        "extra_flops": retrieval,
    }


def accounting(model_or_cfg: nn.Module | ModelConfig) -> dict:
    """Parameters and forward FLOPs per token of a :class:`TransformerLM` or a :class:`ModelConfig`.

    Returns ``total_params``, ``active_params``, ``active_params_non_embedding``,
    ``flops_per_token`` and ``by_type``: for each of ``LAYER_TYPES`` present, a dict with
    ``layers``, ``total_params``, ``active_params``, ``flops_per_token``. Given a model, totals
    are its real parameter counts (so custom layer layouts are counted exactly).
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
    norms = (2 * cfg.n_layers + 1) * D
    add("norms", norms, norms, 0, layers=0)
    for i in range(cfg.n_layers):
        add("attention", attn, attn, 2 * attn + 4 * L * attn_dim)
        ffn = cfg.ffn_for(i)
        a = ffn_accounting(ffn, D)
        kind = "dense_ffn" if ffn.kind == "dense" else ffn.kind
        add(kind, a["total_params"], a["active_params"], 2 * a["matmul_active"] + a["extra_flops"])

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
        "by_type": by_type,
    }
    if model is not None:
        real = sum(p.numel() for p in model.parameters())
        if real != total:  # a module we did not classify: keep the total honest
            out["total_params"] = real
            out["unclassified_params"] = real - total
    return out


def _count_real_totals(model: nn.Module, rows: dict[str, dict[str, int]]) -> None:
    """Replace the analytic FFN totals by the built layers' own parameter counts."""
    real: dict[str, int] = defaultdict(int)
    for i, block in enumerate(model.blocks):
        kind = model.cfg.ffn_for(i).kind
        kind = "dense_ffn" if kind == "dense" else kind
        real[kind] += sum(p.numel() for p in block.ffn.parameters())
    for kind, n in real.items():
        rows[kind]["total_params"] = n
