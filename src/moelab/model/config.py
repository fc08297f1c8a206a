"""Typed configuration of :class:`~moelab.model.TransformerLM` and of its FFN slot.

Defaults follow the ReMoE paper's setup (LLaMA-style decoder, RoPE base 1e6, SwiGLU, no biases,
untied embeddings, init std 0.01); the FFN slot is one flat :class:`FFNConfig` whose ``kind``
selects which of its options apply, so presets stay short (``ffn: {kind: moe, num_experts: 8}``)
and the command line reads ``model.ffn.top_k=2``.

Fields left at ``None`` mean "the kind's default" and are resolved by :meth:`ModelConfig.ffn_for`
(never silently frozen into the config), so overriding ``d_model`` also moves an automatic
``d_hidden``.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import field
from typing import Literal

from moelab.config import Config, check

FFNKind = Literal["dense", "moe", "peer", "pkm"]
Activation = Literal["swiglu", "gelu", "relu", "silu"]

# Which FFNConfig options each kind reads (everything else is ignored and reset to its default).
FFN_OPTIONS: dict[str, tuple[str, ...]] = {
    "dense": ("d_hidden", "activation"),
    "moe": (
        "d_hidden",
        "activation",
        "num_experts",
        "top_k",
        "router",
        "granularity",
        "shared_experts",
        "capacity_factor",
        "renormalize",
        "softmax_after_topk",
        "balance_coef",
        "z_loss_coef",
        "l1_balanced",
        "backend",
    ),
    "peer": ("num_experts", "heads", "top_k", "d_key", "query_batchnorm", "activation", "gate"),
    "pkm": ("num_memories", "heads", "top_k", "d_key", "query_batchnorm"),
}

# Per-kind defaults of the options whose sensible value differs by kind.
_KIND_DEFAULTS: dict[str, dict[str, object]] = {
    "dense": {"activation": "swiglu"},
    "moe": {"activation": "swiglu", "num_experts": 8, "top_k": 1},  # ReMoE's E=8, k=1
    "peer": {"activation": "relu", "num_experts": 1024**2, "top_k": 16},  # PEER paper
    "pkm": {"top_k": 32},  # PEER paper's PKM baseline
}


def auto_d_hidden(d_model: int, activation: str) -> int:
    """LLaMA's FFN width: ``8/3·d_model`` for SwiGLU (same parameters as a ``4·d_model`` GELU MLP),
    rounded up to a multiple of 64 (8 for models narrower than 256); ``4·d_model`` otherwise."""
    if activation != "swiglu":
        return 4 * d_model
    multiple = 64 if d_model >= 256 else 8
    return multiple * math.ceil(8 * d_model / 3 / multiple)


@dataclasses.dataclass(kw_only=True)
class FFNConfig(Config):
    """The FFN slot of the routed blocks. Only the options of ``kind`` apply (see ``FFN_OPTIONS``).

    dense: ``d_hidden``, ``activation``.
    moe: ``d_hidden`` (width of one coarse expert), ``num_experts``, ``top_k``, ``router``
    (``"topk"`` or ReMoE's ``"relu"``, where ``top_k`` only sets the sparsity target 1 − k/E),
    ``granularity``, ``shared_experts``, ``capacity_factor`` (None = dropless), ``renormalize``,
    ``softmax_after_topk``, ``balance_coef``, ``z_loss_coef``, ``l1_balanced``, ``backend``,
    ``activation``.
    peer: ``num_experts`` (a perfect square), ``heads``, ``top_k`` (per head), ``d_key``,
    ``query_batchnorm``, ``activation``, ``gate``.
    pkm: ``num_memories`` (a perfect square), ``heads``, ``top_k``, ``d_key``, ``query_batchnorm``.
    """

    kind: FFNKind = "dense"
    d_hidden: int | None = None  # None: auto_d_hidden(d_model, activation)
    activation: Activation | None = None  # None: swiglu (dense, moe), relu (peer)
    num_experts: int | None = None  # None: 8 (moe), 1024**2 (peer)
    top_k: int | None = None  # None: 1 (moe), 16 (peer), 32 (pkm)
    router: Literal["topk", "relu"] = "topk"
    granularity: int = 1
    shared_experts: int = 0
    capacity_factor: float | None = None
    renormalize: bool = False
    softmax_after_topk: bool = False
    balance_coef: float = 0.01
    z_loss_coef: float = 0.0
    l1_balanced: bool = True
    backend: Literal["auto", "loop", "fused", "bmm", "grouped_mm"] = "auto"
    heads: int = 8
    d_key: int = 128
    query_batchnorm: bool = True
    gate: Literal["softmax", "sigmoid", "relu"] = "softmax"
    num_memories: int = 1024**2

    def __post_init__(self) -> None:
        # Options the kind does not read are reset, so that equal configs compare (and dump) equal.
        used = FFN_OPTIONS.get(self.kind, ())
        for f in dataclasses.fields(self):
            if f.name != "kind" and f.name not in used and f.default is not dataclasses.MISSING:
                setattr(self, f.name, f.default)
        super().__post_init__()

    def dict_fields(self) -> list[str]:
        return ["kind", *FFN_OPTIONS.get(self.kind, ())]

    def option(self, name: str) -> object:
        """The value of option ``name`` with the kind's default filled in."""
        value = getattr(self, name)
        if value is None:
            value = _KIND_DEFAULTS.get(self.kind, {}).get(name)
        return value

    def validate(self) -> None:
        for name in ("d_hidden", "num_experts", "top_k"):
            value = getattr(self, name)
            check(value is None or value > 0, name, f"must be a positive integer, got {value}")
        for name in ("granularity", "heads", "d_key", "num_memories"):
            value = getattr(self, name)
            check(value > 0, name, f"must be a positive integer, got {value}")
        check(
            self.shared_experts >= 0, "shared_experts", f"must be >= 0, got {self.shared_experts}"
        )
        for name in ("balance_coef", "z_loss_coef"):
            value = getattr(self, name)
            check(
                math.isfinite(value) and value >= 0,
                name,
                f"must be a finite number >= 0, got {value}",
            )
        cf = self.capacity_factor
        check(
            cf is None or (math.isfinite(cf) and cf > 0),
            "capacity_factor",
            f"must be null (dropless) or a finite number > 0, got {cf}",
        )
        if self.kind == "moe":
            e, k, g = self.option("num_experts"), self.option("top_k"), self.granularity
            check(k <= e, "top_k", f"must be <= num_experts ({e}), got {k}")
            if self.router == "relu":
                check(
                    k < e,
                    "top_k",
                    f"router 'relu' needs top_k < num_experts (target sparsity 1 - k/E > 0), "
                    f"got top_k={k}, num_experts={e}",
                )
            check(
                self.d_hidden is None or self.d_hidden % g == 0,
                "granularity",
                f"must divide d_hidden ({self.d_hidden}), got {g}",
            )
        if self.kind in ("peer", "pkm"):
            name = "num_experts" if self.kind == "peer" else "num_memories"
            n = self.option(name)
            root = math.isqrt(n)
            check(root * root == n, name, f"must be a perfect square (product keys), got {n}")
            k = self.option("top_k")
            check(k <= root, "top_k", f"must be <= sqrt({name}) = {root}, got {k}")
            check(
                self.d_key % 2 == 0,
                "d_key",
                f"must be even (split in two halves), got {self.d_key}",
            )


@dataclasses.dataclass(kw_only=True)
class ModelConfig(Config):
    """A LLaMA-style decoder LM: embeddings, ``n_layers`` pre-norm blocks, final norm, LM head.

    ``ffn_layers`` chooses the blocks whose FFN is ``ffn`` ("all"; "middle" = the one block
    ``n_layers // 2``, as PEER's paper places its layer; or explicit block indices); the other
    blocks get a dense SwiGLU FFN of width ``dense_d_hidden`` (None: automatic).
    """

    vocab_size: int = 32000
    d_model: int = 512
    n_layers: int = 8
    n_heads: int = 8
    n_kv_heads: int | None = None  # None: n_heads (plain multi-head attention)
    max_seq_len: int = 1024
    rope_base: float = 1e6
    norm_eps: float = 1e-6
    tie_embeddings: bool = False
    init_std: float = 0.01
    scaled_residual_init: bool = True  # output projections get init_std / sqrt(2 * n_layers)
    activation_checkpointing: bool = False
    ffn: FFNConfig = field(default_factory=FFNConfig)
    ffn_layers: Literal["all", "middle"] | list[int] = "all"
    dense_d_hidden: int | None = None

    # ---- derived values -------------------------------------------------------------------------

    @property
    def kv_heads(self) -> int:
        return self.n_heads if self.n_kv_heads is None else self.n_kv_heads

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    def ffn_layer_indices(self) -> list[int]:
        """Blocks whose FFN is the configured slot (the others are dense)."""
        if self.ffn_layers == "all":
            return list(range(self.n_layers))
        if self.ffn_layers == "middle":
            return [self.n_layers // 2]
        return sorted(self.ffn_layers)

    def ffn_for(self, layer: int) -> FFNConfig:
        """The fully resolved FFN config of block ``layer`` (no ``None`` options left)."""
        if layer in self.ffn_layer_indices():
            slot = self.ffn
        else:
            slot = FFNConfig(kind="dense", d_hidden=self.dense_d_hidden, activation="swiglu")
        values = {name: slot.option(name) for name in FFN_OPTIONS[slot.kind]}
        if "d_hidden" in values and values["d_hidden"] is None:
            values["d_hidden"] = auto_d_hidden(self.d_model, values["activation"])
        return FFNConfig(kind=slot.kind, **values)

    # ---- validation -----------------------------------------------------------------------------

    def validate(self) -> None:
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "max_seq_len"):
            value = getattr(self, name)
            check(value > 0, name, f"must be a positive integer, got {value}")
        kv = self.n_kv_heads
        check(kv is None or kv > 0, "n_kv_heads", f"must be a positive integer or null, got {kv}")
        check(
            self.d_model % self.n_heads == 0,
            "n_heads",
            f"must divide d_model ({self.d_model}), got {self.n_heads}",
        )
        check(
            self.n_heads % self.kv_heads == 0,
            "n_kv_heads",
            f"must divide n_heads ({self.n_heads}), got {self.kv_heads}",
        )
        check(
            self.head_dim % 2 == 0,
            "n_heads",
            f"head_dim = d_model / n_heads must be even for RoPE, got {self.head_dim}",
        )
        check(self.rope_base > 0, "rope_base", f"must be > 0, got {self.rope_base}")
        check(self.norm_eps > 0, "norm_eps", f"must be > 0, got {self.norm_eps}")
        check(self.init_std > 0, "init_std", f"must be > 0, got {self.init_std}")
        dh = self.dense_d_hidden
        check(
            dh is None or dh > 0, "dense_d_hidden", f"must be a positive integer or null, got {dh}"
        )
        if isinstance(self.ffn_layers, list):
            for i, idx in enumerate(self.ffn_layers):
                check(
                    0 <= idx < self.n_layers,
                    f"ffn_layers[{i}]",
                    f"must be a block index in [0, {self.n_layers}), got {idx}",
                )
            check(
                len(set(self.ffn_layers)) == len(self.ffn_layers),
                "ffn_layers",
                f"has repeated indices: {self.ffn_layers}",
            )
        if self.ffn.kind == "moe":
            g = self.ffn.granularity
            activation = str(self.ffn.option("activation"))
            d_hidden = self.ffn.d_hidden or auto_d_hidden(self.d_model, activation)
            check(
                d_hidden % g == 0,
                "ffn.granularity",
                f"must divide the expert width d_hidden ({d_hidden}), got {g}",
            )
