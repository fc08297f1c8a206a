"""Data layer: the embedded corpus, the offline tokenizer, token shards and batch samplers.

Public API (see ``docs/CONTRACTS.md`` and ``docs/data.md``): :func:`load_tokenizer`,
:func:`prepare`, :func:`default_dataset_dir`, :class:`TokenDataset`, :class:`BatchSampler`,
:func:`iter_eval_batches`, :func:`check_vocab_compatible`.
"""

from moelab.data.dataset import (
    BatchSampler,
    TokenDataset,
    check_vocab_compatible,
    iter_eval_batches,
)
from moelab.data.default import EMBEDDED_CORPUS, cache_dir, dataset_checksum, default_dataset_dir
from moelab.data.prepare import choose_dtype, prepare, unigram_entropy
from moelab.data.tokenizer import (
    EOS_TOKEN,
    SHIPPED_TOKENIZER,
    TextTokenizer,
    load_tokenizer,
    train_tokenizer,
)

__all__ = [
    "EMBEDDED_CORPUS",
    "EOS_TOKEN",
    "SHIPPED_TOKENIZER",
    "BatchSampler",
    "TextTokenizer",
    "TokenDataset",
    "cache_dir",
    "dataset_checksum",
    "check_vocab_compatible",
    "choose_dtype",
    "default_dataset_dir",
    "iter_eval_batches",
    "load_tokenizer",
    "prepare",
    "train_tokenizer",
    "unigram_entropy",
]
