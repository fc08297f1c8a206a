"""The decoder LM (:class:`TransformerLM`), its typed config, generation and accounting."""

from moelab.model.accounting import accounting, measured_flops
from moelab.model.config import ModelConfig
from moelab.model.ffn_configs import (
    DenseConfig,
    FFNConfig,
    MoEConfig,
    PEERConfig,
    PKMConfig,
    auto_d_hidden,
)
from moelab.model.generate import generate
from moelab.model.transformer import KVCache, TransformerLM

__all__ = [
    "DenseConfig",
    "FFNConfig",
    "KVCache",
    "ModelConfig",
    "MoEConfig",
    "PEERConfig",
    "PKMConfig",
    "TransformerLM",
    "accounting",
    "auto_d_hidden",
    "generate",
    "measured_flops",
]
