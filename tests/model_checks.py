"""Shared model-level helpers of the tests: one tiny MoE language model, one causality check and one
activation-checkpointing check, so every router and model test asks the same questions the same way.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from moelab.model import ModelConfig, TransformerLM

# The tiny model the router and layer tests build: small enough to run in milliseconds, large
# enough that routing differs between tokens. Tests override single fields (``n_layers``, ...).
TINY_LM: dict[str, Any] = {
    "vocab_size": 50,
    "d_model": 16,
    "n_layers": 2,
    "n_heads": 2,
    "max_seq_len": 12,
}
# The same with a 64-token vocabulary and 16 positions (the pruning and router-switch tests).
TINY_LM_64: dict[str, Any] = TINY_LM | {"vocab_size": 64, "max_seq_len": 16}


def tiny_lm_config(
    router: str = "topk",
    *,
    top_k: int = 1,
    router_options: dict[str, Any] | None = None,
    ffn: dict[str, Any] | None = None,
    **model: Any,
) -> ModelConfig:
    """``TINY_LM`` with a 4-expert MoE slot routed by ``router``; ``ffn`` updates the slot,
    ``model`` the model fields (``n_layers=3``, ``init_std=0.2``, ``activation_checkpointing``)."""
    spec: dict[str, Any] = {
        "kind": "moe",
        "router": router,
        "num_experts": 4,
        "top_k": top_k,
        "d_hidden": 16,
    }
    if router_options is not None:
        spec["router_options"] = router_options
    spec |= ffn or {}
    return ModelConfig.from_dict(TINY_LM | {"ffn": spec} | model)


def tiny_lm(router: str = "topk", *, seed: int = 0, **kw: Any) -> TransformerLM:
    """The model of ``tiny_lm_config(router, **kw)``, initialised after ``torch.manual_seed(seed)``
    (so two calls give the same weights, and the global generator is in a known state after)."""
    cfg = tiny_lm_config(router, **kw)
    torch.manual_seed(seed)
    return TransformerLM(cfg)


def shift_tokens(ids: torch.Tensor, at: int, vocab: int, *, shift: int = 1, only: bool = False):
    """A copy of ``ids`` with every token from position ``at`` on (``only``: the one at ``at``)
    moved ``shift`` places along the vocabulary, so each changed token is a different one."""
    changed = ids.clone()
    cols = slice(at, at + 1) if only else slice(at, None)
    changed[:, cols] = (changed[:, cols] + shift) % vocab
    return changed


def first_change(ids: torch.Tensor, changed: torch.Tensor) -> int:
    """The first position at which ``changed`` differs from ``ids`` in some row."""
    assert ids.shape == changed.shape
    differs = (ids != changed).any(dim=0).nonzero()
    assert len(differs), "the changed ids equal the ids: nothing to test"
    return int(differs[0])


def earlier_change(model: torch.nn.Module, ids: torch.Tensor, changed: torch.Tensor) -> float:
    """The largest change of an output before the first changed position (0 for a causal model,
    up to matmul rounding where the two batches group their tokens differently)."""
    at = first_change(ids, changed)
    with torch.no_grad():
        a, b = model(ids), model(changed)
    return float((a[:, :at] - b[:, :at]).abs().max())


def assert_causal(
    model: torch.nn.Module,
    ids: torch.Tensor,
    changed: torch.Tensor,
    *,
    atol: float = 0.0,
    min_change: float = 1e-4,
) -> torch.Tensor:
    """A position's logits do not change when later tokens of its sequence change: every output
    before the first position where ``changed`` differs from ``ids`` is equal within ``atol``
    (``rtol`` 0), and the outputs from that position on move by more than ``min_change`` (so a
    model that ignores its input cannot pass). Returns the logits of ``ids``."""
    at = first_change(ids, changed)
    with torch.no_grad():
        a, b = model(ids), model(changed)
    torch.testing.assert_close(a[:, :at], b[:, :at], rtol=0, atol=atol)
    moved = float((a[:, at:] - b[:, at:]).abs().max())
    assert moved > min_change, f"changing tokens from {at} on moved the logits by only {moved}"
    return a


def assert_checkpointing_keeps_grads(
    build: Callable[[bool], torch.nn.Module],
    ids: torch.Tensor,
    *,
    loss: Callable[[torch.nn.Module, torch.Tensor], torch.Tensor] | None = None,
    rtol: float | None = None,
    atol: float | None = None,
) -> None:
    """Activation checkpointing recomputes exactly what the first forward computed:
    ``build(checkpointing)`` gives the same model with it off and on; in training mode their
    logits are equal to the bit and every parameter's gradient of ``loss`` (default: the mean
    squared logit) is equal within ``rtol``/``atol`` (default: ``assert_close``'s for the dtype);
    every parameter gets a gradient."""
    outs, grads = [], []
    for ckpt in (False, True):
        model = build(ckpt).train()
        logits = model(ids)
        (loss(model, logits) if loss else logits.square().mean()).backward()
        outs.append(logits.detach())
        missing = [n for n, p in model.named_parameters() if p.grad is None]
        assert not missing, f"no gradient for {missing} (checkpointing={ckpt})"
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    torch.testing.assert_close(outs[0], outs[1], rtol=0, atol=0)
    for name, g in grads[0].items():
        torch.testing.assert_close(g, grads[1][name], rtol=rtol, atol=atol, msg=name)
