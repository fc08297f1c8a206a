"""Offline tokenizers: the shipped byte-level BPE, or any local Hugging Face ``tokenizer.json``.

Why a wrapper: the rest of moelab needs only ``encode``/``decode``/``vocab_size``/``eos_id``, and
must not depend on ``transformers`` or network access, so we read ``tokenizer.json`` with the
``tokenizers`` library directly and find the end-of-text token ourselves.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from moelab.provenance import file_sha256  # also imported from here by callers

EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"
SPECIAL_TOKENS = [EOS_TOKEN, PAD_TOKEN]
# Names other tokenizers use for "end of document", in order of preference.
EOS_CANDIDATES = (EOS_TOKEN, "</s>", "<eos>", "<|end_of_text|>", "<|im_end|>", "[SEP]")

SHIPPED_TOKENIZER = Path(__file__).resolve().parent / "tokenizer" / "tokenizer.json"


class TextTokenizer:
    """A thin, picklable-by-path wrapper over a ``tokenizers.Tokenizer``."""

    def __init__(self, path: Path, eos_token: str | None = None) -> None:
        self.path = Path(path).resolve()
        self._tok = Tokenizer.from_file(str(self.path))
        self.vocab_size: int = self._tok.get_vocab_size(with_added_tokens=True)
        self.eos_token = eos_token or _find_eos(self._tok, self.path.parent)
        self.eos_id: int | None = (
            self._tok.token_to_id(self.eos_token) if self.eos_token is not None else None
        )
        if eos_token is not None and self.eos_id is None:
            raise ValueError(f"eos_token {eos_token!r} is not in the vocabulary of {self.path}")

    @property
    def sha256(self) -> str:
        return file_sha256(self.path)

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Encode many texts at once (parallel in the Rust library; much faster than a loop)."""
        return [e.ids for e in self._tok.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def __len__(self) -> int:
        return self.vocab_size

    def __repr__(self) -> str:
        return f"TextTokenizer(path={str(self.path)!r}, vocab_size={self.vocab_size})"


def _find_eos(tok: Tokenizer, directory: Path) -> str | None:
    config = directory / "tokenizer_config.json"
    if config.is_file():
        try:
            eos = json.loads(config.read_text("utf-8")).get("eos_token")
        except (json.JSONDecodeError, OSError):
            eos = None
        if isinstance(eos, dict):
            eos = eos.get("content")
        if isinstance(eos, str) and tok.token_to_id(eos) is not None:
            return eos
    for name in EOS_CANDIDATES:
        if tok.token_to_id(name) is not None:
            return name
    return None


def resolve_tokenizer_path(path: str | Path | None) -> Path:
    """Map ``None`` / a directory / a file to the ``tokenizer.json`` to load (else ValueError)."""
    if path is None:
        return SHIPPED_TOKENIZER
    p = Path(path).expanduser()
    if p.is_dir():
        p = p / "tokenizer.json"
        if not p.is_file():
            raise ValueError(
                f"tokenizer: directory {path} has no tokenizer.json "
                "(allowed: a tokenizer.json file or a Hugging Face tokenizer directory)"
            )
    elif not p.is_file():
        raise ValueError(f"tokenizer: {path} does not exist")
    return p


def load_tokenizer(path: str | Path | None = None, eos_token: str | None = None) -> TextTokenizer:
    """Load the shipped BPE (``path=None``), a tokenizer.json, or a local HF tokenizer directory."""
    p = resolve_tokenizer_path(path)
    try:
        return TextTokenizer(p, eos_token=eos_token)
    except ValueError:
        raise
    except Exception as err:  # tokenizers raises a bare Exception on malformed files
        raise ValueError(f"tokenizer: cannot read {p} as a tokenizer.json: {err}") from err


def train_tokenizer(texts: Iterable[str], out: str | Path, vocab_size: int = 8192) -> Path:
    """Train a byte-level BPE (GPT-2 style pre-tokenisation) and save it as ``tokenizer.json``.

    Byte-level means every string is encodable (no unknown token), which matters for code.
    """
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tok.save(str(out))
    return out
