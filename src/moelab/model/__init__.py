"""The decoder LM (:class:`TransformerLM`), its typed config, generation and accounting."""

from moelab.model.accounting import accounting
from moelab.model.config import FFNConfig, ModelConfig, auto_d_hidden
from moelab.model.generate import generate
from moelab.model.transformer import KVCache, TransformerLM, build_ffn

__all__ = [
    "FFNConfig",
    "KVCache",
    "ModelConfig",
    "TransformerLM",
    "accounting",
    "auto_d_hidden",
    "build_ffn",
    "generate",
]
