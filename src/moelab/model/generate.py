"""Sampling from a :class:`~moelab.model.TransformerLM` with a KV cache."""

from __future__ import annotations

import torch
from torch import Tensor

from moelab.model.transformer import TransformerLM


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


def sample_next(
    logits_BV: Tensor, temperature: float, top_p: float, generator: torch.Generator | None
) -> Tensor:
    """Next ids ``[B]``: argmax at temperature 0, else nucleus sampling (Holtzman et al. 2020)
    over :func:`nucleus_filter`'s tokens (the most likely token is always kept), renormalised."""
    if temperature == 0:
        return logits_BV.argmax(dim=-1)
    probs_BV = nucleus_filter(torch.softmax(logits_BV.float() / temperature, dim=-1), top_p)
    return torch.multinomial(probs_BV, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate(
    model: TransformerLM,
    input_ids: Tensor,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    seed: int | None = None,
    eos_id: int | None = None,
) -> Tensor:
    """Continue ``input_ids`` (``[B, L]`` or ``[L]``) by up to ``max_new_tokens`` tokens.

    The prompt is run once to fill the KV cache, then one token per step. ``temperature=0`` is
    greedy. With ``eos_id``, a sequence that has produced it keeps emitting ``eos_id`` and
    generation stops once all have. Returns prompt + continuation, same rank as ``input_ids``.
    The model is run in eval mode (restored afterwards), so routing statistics are not touched.
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

    was_training = model.training
    model.eval()
    try:
        cache = model.new_kv_cache(ids_BL.shape[0], max_len=total)
        logits_BLV = model(ids_BL, kv_cache=cache)
        done_B = torch.zeros(ids_BL.shape[0], dtype=torch.bool, device=device)
        out = [ids_BL]
        for step in range(max_new_tokens):
            next_B = sample_next(logits_BLV[:, -1], temperature, top_p, generator)
            if eos_id is not None:
                next_B = torch.where(done_B, torch.full_like(next_B, eos_id), next_B)
                done_B |= next_B == eos_id
            out.append(next_B[:, None])
            if (eos_id is not None and bool(done_B.all())) or step == max_new_tokens - 1:
                break
            logits_BLV = model(next_B[:, None], kv_cache=cache)
    finally:
        model.train(was_training)
    result = torch.cat(out, dim=1)
    return result[0] if squeeze else result
