"""Sampling from a :class:`~moelab.model.TransformerLM` with a KV cache."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import torch
from torch import Tensor

from moelab.model.decode_step import FastStep, model_decodes_fast
from moelab.model.transformer import KVCache, TransformerLM


def nucleus_filter(probs_BV: Tensor, top_p: float) -> Tensor:
    """``probs_BV`` with every token outside the nucleus zeroed (not renormalised).

    The nucleus is the smallest set of most-likely tokens whose probability reaches ``top_p``: a
    token is kept while the mass of the tokens ranked above it is below ``top_p``. That mass is an
    exclusive running sum in float64, so with a large vocabulary it does not drift by float32
    rounding across the boundary (ties keep the order ``sort`` gives them).
    """
    if top_p >= 1.0:
        return probs_BV
    sorted_BV, order_BV = probs_BV.sort(dim=-1, descending=True)
    mass_BV = sorted_BV.double().cumsum(dim=-1)
    mass_before_BV = torch.cat([torch.zeros_like(mass_BV[..., :1]), mass_BV[..., :-1]], dim=-1)
    sorted_BV = sorted_BV.masked_fill(mass_before_BV >= top_p, 0.0)
    return torch.zeros_like(probs_BV).scatter(-1, order_BV, sorted_BV)


ARGMAX_BLOCK = 128
"""Block width of :func:`greedy_ids`' first pass."""


def greedy_ids(logits_BV: Tensor) -> Tensor:
    """``logits_BV.argmax(-1)``, the same ids (first maximum; the first NaN where a row has one),
    in two passes for several rows: the block maxima (a vectorised ``amax``), the first block
    holding the row's maximum, then the first maximum within it. On CPU ``argmax`` over the last
    dim runs a scalar loop per row: [16, 8192] took 110 us against 27 us this way (1 thread)."""
    B, V = logits_BV.shape
    if B < 2 or V % ARGMAX_BLOCK or logits_BV.device.type != "cpu":
        return logits_BV.argmax(dim=-1)
    blocks_BNK = logits_BV.view(B, V // ARGMAX_BLOCK, ARGMAX_BLOCK)
    block_B = blocks_BNK.amax(dim=-1).argmax(dim=-1)  # amax and argmax both propagate NaN
    rows_B = torch.arange(B, device=logits_BV.device)
    return block_B * ARGMAX_BLOCK + blocks_BNK[rows_B, block_B].argmax(dim=-1)


def sample_next(
    logits_BV: Tensor, temperature: float, top_p: float, generator: torch.Generator | None
) -> Tensor:
    """Next ids ``[B]``: argmax at temperature 0 (:func:`greedy_ids`), else nucleus sampling
    (Holtzman et al. 2020) over :func:`nucleus_filter`'s tokens (the most likely token is always
    kept), renormalised."""
    if temperature == 0:
        return greedy_ids(logits_BV)
    probs_BV = nucleus_filter(torch.softmax(logits_BV.float() / temperature, dim=-1), top_p)
    return torch.multinomial(probs_BV, 1, generator=generator).squeeze(-1)


class Decoder(Protocol):
    """What :func:`generate` asks for the next-token logits: one call for the prompt, one per
    new token. :class:`PlainDecoder` runs the model with a KV cache; MoE-aware decoders
    (:mod:`moelab.eval.decoding`) combine or adapt passes behind the same two calls."""

    def prefill(self, ids_BL: Tensor, pad_B: Tensor | None, max_len: int) -> Tensor:
        """Logits ``[B, V]`` after the (left-padded) prompt; sets up caches of ``max_len``."""
        ...

    def step(self, next_B: Tensor) -> Tensor:
        """Logits ``[B, V]`` after appending one token per row."""
        ...

    def remove(self) -> None:
        """Undo whatever the decoder changed on the model (routing offsets, ...)."""
        ...


class PlainDecoder:
    """The model's own distribution: one KV cache, allocated once at its final size.

    The prompt runs through the model's forward; each new token, with ``fast`` (default), through
    :class:`~moelab.model.decode_step.FastStep` (the same arithmetic with less per-step
    overhead), else through the forward too.
    """

    def __init__(self, model: TransformerLM, fast: bool = True) -> None:
        self.model = model
        self.fast = fast and model_decodes_fast(model)
        self.cache: KVCache | None = None
        self._step: FastStep | None = None

    def prefill(self, ids_BL: Tensor, pad_B: Tensor | None, max_len: int) -> Tensor:
        self.cache = self.model.new_kv_cache(ids_BL.shape[0], max_len=max_len)
        if pad_B is not None:
            self.cache.set_left_padding(pad_B)
        logits_BV = self.model(ids_BL, kv_cache=self.cache)[:, -1]
        self._step = FastStep(self.model, self.cache) if self.fast else None
        return logits_BV

    def fork(self, max_len: int) -> PlainDecoder:
        """A decoder that goes on from this one's state (its KV cache copied, room for
        ``max_len`` positions) without touching it; unprefilled, a fresh one."""
        new = PlainDecoder(self.model, self.fast)
        if self.cache is not None:
            new.cache = self.cache.fork(max_len)
            new._step = FastStep(self.model, new.cache) if new.fast else None
        return new

    def step(self, next_B: Tensor) -> Tensor:
        if self._step is not None:
            return self._step(next_B)
        return self.model(next_B[:, None], kv_cache=self.cache)[:, -1]

    def remove(self) -> None:
        """Nothing to take off the model (the MoE-aware decoders undo their routing changes)."""


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int = 0) -> tuple[Tensor, Tensor]:
    """Prompts of different lengths as one left-padded batch: ids ``[B, L]`` and the attention
    mask ``[B, L]`` (1 = real token) that :func:`generate` takes."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("prompts: need at least one prompt, each of at least one token")
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, p in enumerate(prompts):
        ids[row, width - len(p) :] = torch.as_tensor(list(p), dtype=torch.long)
        mask[row, width - len(p) :] = 1
    return ids, mask


def left_padding(attention_mask: Tensor, shape: tuple[int, ...]) -> Tensor:
    """Padding per row ``[B]`` of a left-padded ``attention_mask`` (zeros only before the first
    real token, at least one real token per row); a one-line error otherwise."""
    if tuple(attention_mask.shape) != shape:
        raise ValueError(
            f"attention_mask must have the shape of input_ids {shape}, "
            f"got {tuple(attention_mask.shape)}"
        )
    real_BL = attention_mask.bool()
    pad_B = (~real_BL).long().cumprod(dim=1).sum(dim=1)  # leading zeros of each row
    if bool((pad_B == shape[1]).any()) or not bool((real_BL.sum(1) + pad_B == shape[1]).all()):
        raise ValueError(
            "attention_mask must be left padding: zeros only before each row's first real "
            "token, and at least one real token per row"
        )
    return pad_B


@torch.no_grad()
def generate(
    model: TransformerLM,
    input_ids: Tensor,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    seed: int | None = None,
    eos_id: int | None = None,
    attention_mask: Tensor | None = None,
    decoder: Decoder | None = None,
) -> Tensor:
    """Continue ``input_ids`` (``[B, L]`` or ``[L]``) by up to ``max_new_tokens`` tokens.

    The prompt is run once to fill the KV cache, then one token per step. ``temperature=0`` is
    greedy. With ``eos_id``, a sequence that has produced it keeps emitting ``eos_id`` and
    generation stops once all have. Returns prompt + continuation, same rank as ``input_ids``.
    The model is run in eval mode (restored afterwards), so routing statistics are not touched.

    ``attention_mask`` (``[B, L]``, 1 = real token, :func:`left_pad` makes one) batches prompts
    of different lengths by left padding: padded positions are masked out of attention and out
    of routing, and each row's positions count from its own first token, so every row continues
    as it would alone. ``decoder`` replaces the model's own next-token distribution (default:
    :class:`PlainDecoder`).
    """
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    squeeze = input_ids.dim() == 1
    ids_BL = input_ids[None] if squeeze else input_ids
    if ids_BL.dim() != 2 or ids_BL.shape[1] == 0:
        raise ValueError(
            f"input_ids must be [B, L] or [L] with L >= 1, got {tuple(input_ids.shape)}"
        )
    pad_B = None
    if attention_mask is not None:
        mask_BL = attention_mask[None] if squeeze else attention_mask
        pad_B = left_padding(mask_BL, tuple(ids_BL.shape))
    total = ids_BL.shape[1] + max_new_tokens
    if total > model.cfg.max_seq_len:
        raise ValueError(
            f"prompt ({ids_BL.shape[1]}) + max_new_tokens ({max_new_tokens}) exceeds "
            f"max_seq_len={model.cfg.max_seq_len}"
        )
    device = model.tok_emb.weight.device
    ids_BL = ids_BL.to(device)
    generator = None
    if seed is not None:
        generator = torch.Generator(device=device)
        generator.manual_seed(seed)

    decoder = PlainDecoder(model) if decoder is None else decoder
    batch = ids_BL.shape[0]
    out_BT = torch.empty((batch, total), dtype=torch.long, device=device)
    out_BT[:, : ids_BL.shape[1]] = ids_BL
    was_training = model.training
    model.eval()
    try:
        logits_BV = decoder.prefill(ids_BL, pad_B, total)
        done_B = torch.zeros(batch, dtype=torch.bool, device=device)
        eos_B = None if eos_id is None else torch.full((batch,), eos_id, device=device)
        end = ids_BL.shape[1]
        for step in range(max_new_tokens):
            next_B = sample_next(logits_BV, temperature, top_p, generator)
            if eos_B is not None:
                next_B = torch.where(done_B, eos_B, next_B)
                done_B |= next_B == eos_B
            out_BT[:, end] = next_B
            end += 1
            # the EOS check is the loop's one device sync, and only with an eos_id
            if step == max_new_tokens - 1 or (eos_B is not None and bool(done_B.all())):
                break
            logits_BV = decoder.step(next_B)
    finally:
        model.train(was_training)
    result = out_BT[:, :end]
    return result[0] if squeeze else result
