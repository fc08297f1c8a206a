"""The single-token decode step of generate (moelab.model.decode_step.FastStep) against the
model's general forward: same logits (double precision) and same greedy tokens, for every router
that decodes causally, at batch 1 and for a left-padded batch, and on the fallback paths."""

from __future__ import annotations

import pytest
import torch
from test_batched_generation import PROMPTS, decodable_routers, model_for

from model_checks import tiny_lm
from moelab.model import generate
from moelab.model.decode_step import (
    HEAD_COPY_MIN_STEPS,
    FastStep,
    _rms_norm,
    model_decodes_fast,
)
from moelab.model.generate import PlainDecoder, left_pad
from moelab.model.transformer import RMSNorm

NEW = 6


def both(model, ids, mask=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy tokens of the general forward and of the fast step."""
    slow = generate(
        model, ids, NEW, temperature=0, attention_mask=mask, decoder=PlainDecoder(model, fast=False)
    )
    fast = generate(model, ids, NEW, temperature=0, attention_mask=mask)
    return slow, fast


@pytest.mark.parametrize("router", decodable_routers())
def test_greedy_tokens_equal_the_general_forward(router: str) -> None:
    model = model_for(router)
    assert model_decodes_fast(model)
    for prompt in PROMPTS:  # batch 1
        slow, fast = both(model, torch.tensor(prompt))
        assert fast.tolist() == slow.tolist(), prompt
    ids, mask = left_pad(PROMPTS)  # a left-padded batch
    slow, fast = both(model, ids, mask)
    assert torch.equal(fast, slow)


@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("attn", [{}, {"qk_norm": "head"}, {"qkv_bias": True}])
def test_step_logits_equal_the_forward(padded: bool, attn: dict) -> None:
    """Each step's logits against ``model(ids[:, None], kv_cache)`` on a second cache, with
    attention on the short path and on its fallback (q/k norms, biases)."""
    model = tiny_lm("topk", max_seq_len=16, n_layers=3, **attn).double().eval()
    ids, mask = left_pad(PROMPTS) if padded else (torch.tensor([PROMPTS[1]] * 2), None)
    caches = [model.new_kv_cache(ids.shape[0], max_len=16) for _ in range(2)]
    if padded:
        for cache in caches:
            cache.set_left_padding((mask == 0).sum(1))
    with torch.no_grad():
        logits = [model(ids, kv_cache=c)[:, -1] for c in caches][0]
        step = FastStep(model, caches[1])
        for _ in range(NEW):
            next_B = logits.argmax(-1)
            logits = model(next_B[:, None], kv_cache=caches[0])[:, -1]
            torch.testing.assert_close(step(next_B), logits, rtol=1e-10, atol=1e-10)
    assert caches[0].length == caches[1].length


@pytest.mark.parametrize("copy_head", [True, False])
@pytest.mark.parametrize("router", ["topk", "relu"])
def test_step_logits_with_and_without_the_head_copy(router: str, copy_head: bool) -> None:
    """The LM head's transposed copy is made only when enough steps remain in the cache; with it
    and without it each step's logits equal the forward's (float64, left-padded batch of 3)."""
    model = model_for(router).double()
    ids, mask = left_pad(PROMPTS)
    room = HEAD_COPY_MIN_STEPS + 1 if copy_head else HEAD_COPY_MIN_STEPS - 1
    max_len = ids.shape[1] + room
    caches = [model.new_kv_cache(ids.shape[0], max_len=max_len) for _ in range(2)]
    for cache in caches:
        cache.set_left_padding((mask == 0).sum(1))
    with torch.no_grad():
        logits = [model(ids, kv_cache=c)[:, -1] for c in caches][0]
        step = FastStep(model, caches[1])
        assert (step.head_DV is not None) == copy_head
        for _ in range(room):
            next_B = logits.argmax(-1)
            logits = model(next_B[:, None], kv_cache=caches[0])[:, -1]
            torch.testing.assert_close(step(next_B), logits, rtol=1e-10, atol=1e-10)


def test_generated_ids_train_like_any_tensor() -> None:
    """The fast step runs in inference mode; what generate returns still goes into training."""
    model = model_for("topk")
    out = generate(model, torch.tensor(PROMPTS[0]), NEW, temperature=0)
    model.train()
    model(out[None]).sum().backward()
    assert model.tok_emb.weight.grad is not None


@pytest.mark.parametrize("dim", [8, 128, 344])
def test_float32_norm_is_the_modules_bit_for_bit(dim: int) -> None:
    """The fused ``F.rms_norm`` call against the module's formula: equal bits, rows of several
    scales (the float64 and bf16 paths run the module itself)."""
    norm = RMSNorm(dim, 1e-6)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 2.0)
    x = torch.randn(16, 1, dim) * torch.logspace(-3, 3, 16)[:, None, None]
    assert torch.equal(_rms_norm(norm, x), norm(x))


def test_float32_greedy_tokens_equal_the_general_forward() -> None:
    """float32 (the inlined norm, the default dtype): the same greedy tokens, batch 1 and padded."""
    model = tiny_lm("topk", max_seq_len=16, n_layers=3, init_std=0.2).eval()
    slow, fast = both(model, torch.tensor(PROMPTS[1]))
    assert torch.equal(fast, slow)
    ids, mask = left_pad(PROMPTS)
    slow, fast = both(model, ids, mask)
    assert torch.equal(fast, slow)


def test_bfloat16_step_is_close_to_the_forward() -> None:
    """bf16 weights and cache (the rotation in float32, as apply_rope): logits of a step within
    bf16 rounding of the forward's."""
    model = tiny_lm("topk", max_seq_len=16, n_layers=3).to(torch.bfloat16).eval()
    ids = torch.tensor([PROMPTS[1]])
    caches = [model.new_kv_cache(1, max_len=16) for _ in range(2)]
    with torch.no_grad():
        logits = [model(ids, kv_cache=c)[:, -1] for c in caches][0]
        next_B = logits.argmax(-1)
        want = model(next_B[:, None], kv_cache=caches[0])[:, -1].float()
        got = FastStep(model, caches[1])(next_B).float()
    assert got.dtype == want.dtype
    torch.testing.assert_close(got, want, rtol=0.05, atol=0.05)
