"""Text in, text out: tokenise a prompt, sample with the KV cache (``moelab.model.generate``)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from moelab.data.tokenizer import TextTokenizer
from moelab.eval.decoding import make_decoder
from moelab.model import generate

__all__ = ["generate_text"]


def generate_text(
    model: nn.Module,
    tokenizer: TextTokenizer,
    prompt: str,
    max_new_tokens: int = 64,
    temperature: float = 0.8,
    top_p: float = 0.95,
    seed: int | None = 0,
    decoding: str = "plain",
    decoding_options: dict[str, Any] | None = None,
) -> str:
    """The prompt's continuation (prompt not included); stops at the tokenizer's end-of-text.

    The prompt and the new tokens must fit in the model's ``max_seq_len`` (the KV cache size).
    ``decoding`` picks the next-token scores (:func:`moelab.eval.decoding.make_decoder`: plain,
    SCMoE, test-time rerouting; ``decoding_options`` its options); the model routes as trained
    again afterwards.
    """
    if max_new_tokens < 1:  # temperature and top_p are checked by moelab.model.generate
        raise ValueError(f"max_new_tokens: must be >= 1, got {max_new_tokens}")
    ids = tokenizer.encode(prompt)
    if tokenizer.eos_id is not None:
        ids = [tokenizer.eos_id, *ids]  # documents start after an end-of-text, as in training
    max_len = model.cfg.max_seq_len
    if len(ids) + max_new_tokens > max_len:
        raise ValueError(
            f"max_new_tokens: prompt ({len(ids)} tokens) + max_new_tokens ({max_new_tokens}) "
            f"exceeds the model's max_seq_len ({max_len})"
        )
    decoder = make_decoder(model, decoding, **(decoding_options or {}))
    device = next(model.parameters()).device
    prompt_ids = torch.tensor([ids], dtype=torch.long, device=device)
    try:
        out = generate(
            model,
            prompt_ids,
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            top_p=top_p,
            seed=seed,
            eos_id=tokenizer.eos_id,
            decoder=decoder,
        )
    finally:
        decoder.remove()
    new = out[0, len(ids) :].tolist()
    if tokenizer.eos_id is not None and tokenizer.eos_id in new:
        new = new[: new.index(tokenizer.eos_id)]
    return tokenizer.decode(new)
