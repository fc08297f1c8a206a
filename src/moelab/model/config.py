"""Typed configuration of :class:`~moelab.model.TransformerLM`.

Defaults follow the ReMoE paper's setup (LLaMA-style decoder, RoPE base 1e6, SwiGLU, no biases,
untied embeddings, init std 0.01). The FFN slot is one of the per-kind configs of
:mod:`moelab.model.ffn_configs` (``ffn: {kind: moe, num_experts: 8}``; the command line reads
``model.ffn.top_k=2``). Automatic values (``d_hidden: null``) are resolved by
:meth:`ModelConfig.ffn_for`, never frozen into the config, so overriding ``d_model`` also moves an
automatic ``d_hidden``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import field
from typing import Any, ClassVar, Literal

from moelab.config import Config, ConfigError, check
from moelab.model.ffn_configs import DenseConfig, FFNConfig


@dataclasses.dataclass(kw_only=True)
class ModelConfig(Config):
    """A LLaMA-style decoder LM: embeddings, ``n_layers`` pre-norm blocks, final norm, LM head.

    ``ffn_layers`` chooses the blocks whose FFN is ``ffn`` ("all"; "middle" = the one block
    ``n_layers // 2``, as PEER's paper places its layer; or explicit block indices); the other
    blocks get a dense SwiGLU FFN of width ``dense_d_hidden`` (None: automatic).

    ``qkv_bias``, ``qk_norm`` and ``head_size`` exist so that models of other families convert
    into moelab unchanged (:mod:`moelab.hf`): biases on the query/key/value projections (Qwen2),
    RMSNorm of the queries and keys after projection, over the whole projection (``full``, OLMoE)
    or per head (``head``, Qwen3), and a head size other than ``d_model / n_heads`` (Qwen3).
    They are written to ``config.yaml`` only when set.
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
    ffn: FFNConfig = field(default_factory=DenseConfig)
    ffn_layers: Literal["all", "middle"] | list[int] = "all"
    dense_d_hidden: int | None = None
    qkv_bias: bool = False
    qk_norm: Literal["none", "full", "head"] = "none"
    head_size: int | None = None  # None: d_model // n_heads

    # options of imported architectures, left out of config.yaml at their defaults
    OPTIONAL_FIELDS: ClassVar[dict[str, Any]] = {
        "qkv_bias": False,
        "qk_norm": "none",
        "head_size": None,
    }

    def dict_fields(self) -> list[str]:
        """Every field but the imported-architecture options still at their defaults (so the
        config files of ordinary runs do not change)."""
        return [
            f.name
            for f in dataclasses.fields(self)
            if f.name not in self.OPTIONAL_FIELDS
            or getattr(self, f.name) != self.OPTIONAL_FIELDS[f.name]
        ]

    # ---- derived values -------------------------------------------------------------------------

    @property
    def kv_heads(self) -> int:
        return self.n_heads if self.n_kv_heads is None else self.n_kv_heads

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads if self.head_size is None else self.head_size

    def ffn_layer_indices(self) -> list[int]:
        """Blocks whose FFN is the configured slot (the others are dense)."""
        if self.ffn_layers == "all":
            return list(range(self.n_layers))
        if self.ffn_layers == "middle":
            return [self.n_layers // 2]
        return sorted(self.ffn_layers)

    def ffn_for(self, layer: int) -> FFNConfig:
        """The FFN config of block ``layer``, automatic values resolved (the slot's config for
        the blocks in :meth:`ffn_layer_indices`, a dense SwiGLU FFN for the others)."""
        slot = (
            self.ffn
            if layer in self.ffn_layer_indices()
            else DenseConfig(d_hidden=self.dense_d_hidden)
        )
        return slot.resolved(self.d_model).for_seq_len(self.max_seq_len, "max_seq_len")

    def check_seq_len(self, seq_len: int, where: str) -> None:
        """Refuse a training sequence length the FFN slot cannot learn from (Lory: a
        ``segment_len`` that leaves one segment per sequence), as a :class:`ConfigError` on the
        slot's option (``ffn.router_options.segment_len``)."""
        try:
            slot = self.ffn.resolved(self.d_model).for_seq_len(self.max_seq_len, "max_seq_len")
            slot.for_seq_len(seq_len, where)
        except ConfigError as err:
            option = err.field.removeprefix("router_options.")
            if option != err.field and option not in getattr(self.ffn, "router_options", {}):
                err = ConfigError(
                    err.field,
                    f"{err.message} (the value derived from max_seq_len={self.max_seq_len}; "
                    "set it explicitly)",
                )
            raise err.under("ffn") from None

    # ---- validation -----------------------------------------------------------------------------

    def validate(self) -> None:
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "max_seq_len"):
            value = getattr(self, name)
            check(value > 0, name, f"must be a positive integer, got {value}")
        kv = self.n_kv_heads
        check(kv is None or kv > 0, "n_kv_heads", f"must be a positive integer or null, got {kv}")
        hs = self.head_size
        check(hs is None or hs > 0, "head_size", f"must be a positive integer or null, got {hs}")
        check(
            hs is not None or self.d_model % self.n_heads == 0,
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
            "n_heads" if hs is None else "head_size",
            f"head_dim = d_model / n_heads must be even for RoPE, got {self.head_dim}"
            if hs is None
            else f"must be even for RoPE, got {hs}",
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
        try:  # checks that need the model's width or length (granularity vs an automatic
            # d_hidden; Lory's segment_len vs max_seq_len)
            self.ffn.resolved(self.d_model).for_seq_len(self.max_seq_len, "max_seq_len")
        except ConfigError as err:
            raise err.under("ffn") from None
