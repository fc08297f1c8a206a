"""Batched generation of prompts of different lengths (left padding): each row continues as it
would alone, for every router that decodes causally, and padding never reaches routing."""

from __future__ import annotations

import pytest
import torch

from model_checks import tiny_lm
from moelab.layers.routers import router_class
from moelab.layers.routers.registry import routers_with
from moelab.model import generate
from moelab.model.generate import left_pad

PROMPTS = [[5, 9, 2], [7, 1, 3, 3, 8, 4, 6], [11, 2, 40, 3, 9]]
NEW = 5


def decodable_routers() -> list[str]:
    """Routers whose default options are causal at inference and decode with a KV cache."""
    return [
        name
        for name in routers_with("causal_at_inference")
        if router_class(name).refusal("causal_at_inference") is None
        and not getattr(router_class(name), "kv_cache_error", None)
    ]


def model_for(router: str):
    cls = router_class(router)
    model = tiny_lm(
        router,
        top_k=cls.example_top_k,
        router_options=cls.example_options(16) or None,
        max_seq_len=16,
        init_std=0.2,
        n_layers=3,
    )
    return model.double().eval()


@pytest.mark.parametrize("router", decodable_routers())
def test_batched_mixed_lengths_equal_one_by_one(router: str) -> None:
    model = model_for(router)
    ids, mask = left_pad(PROMPTS)
    batched = generate(model, ids, NEW, temperature=0, attention_mask=mask)
    for row, prompt in enumerate(PROMPTS):
        alone = generate(model, torch.tensor(prompt), NEW, temperature=0)
        assert batched[row, ids.shape[1] :].tolist() == alone[len(prompt) :].tolist(), row


def test_left_padded_row_has_the_logits_of_the_row_alone() -> None:
    """Positions (RoPE) and attention of a padded row: prefill logits equal the unpadded run."""
    model = model_for("topk")
    ids, mask = left_pad(PROMPTS)
    cache = model.new_kv_cache(len(PROMPTS))
    cache.set_left_padding((mask == 0).sum(1))
    with torch.no_grad():
        batched = model(ids, kv_cache=cache)
        for row, prompt in enumerate(PROMPTS):
            alone = model(torch.tensor([prompt]))
            torch.testing.assert_close(batched[row, -len(prompt) :], alone[0], rtol=0, atol=1e-10)


@pytest.mark.parametrize("router", ["topk", "relu"])
def test_padding_never_reaches_an_expert(router: str) -> None:
    """Every routing decision of a batched generation reads real tokens only, and the experts'
    loads summed over the batched generation equal those of the rows generated one by one."""

    def loads(ids, mask=None):
        counts, padded_hits = [], []

        def observe(layer, decision, x_TD):
            counts.append(decision.tokens_per_expert_E.clone())
            if mask is not None and x_TD.shape[0] == mask.numel():  # the prefill forward
                padded_T = (mask == 0).reshape(-1)
                padded_hits.append(int(padded_T[decision.token_idx_N].sum()))

        for layer in model.routed_layers():
            layer.routing_observer = observe
        generate(model, ids, NEW, temperature=0, attention_mask=mask)
        for layer in model.routed_layers():
            layer.routing_observer = None
        return torch.stack(counts).sum(0), padded_hits

    model = model_for(router)
    ids, mask = left_pad(PROMPTS)
    batched, padded_hits = loads(ids, mask)
    assert padded_hits and set(padded_hits) == {0}
    alone = sum(loads(torch.tensor(p))[0] for p in PROMPTS)
    assert batched.tolist() == alone.tolist()


def test_stats_count_real_tokens_only() -> None:
    """With statistics forced on, a padded prefill counts its real tokens only."""
    model = model_for("relu")
    ids, mask = left_pad(PROMPTS)
    cache = model.new_kv_cache(len(PROMPTS))
    cache.set_left_padding((mask == 0).sum(1))
    for layer in model.routed_layers():
        layer.force_stats = True
    with torch.no_grad():
        model(ids, kv_cache=cache)
    for layer in model.routed_layers():
        assert int(layer.last_stats.num_tokens) == sum(map(len, PROMPTS))
        assert int(layer.last_stats.tokens_per_expert.sum()) == int(layer.last_stats.active_sum)


def test_bad_attention_mask_is_refused_in_one_line() -> None:
    model = model_for("topk")
    ids, mask = left_pad(PROMPTS)
    right = mask.flip(1)
    with pytest.raises(ValueError, match="attention_mask must be left padding"):
        generate(model, ids, 2, temperature=0, attention_mask=right)
    with pytest.raises(ValueError, match="attention_mask must have the shape"):
        generate(model, ids, 2, temperature=0, attention_mask=mask[:, 1:])


def test_decode_loop_equals_the_previous_loop() -> None:
    """The preallocated-buffer loop gives the tokens of the previous one (a cache forward per
    token and ``torch.cat`` of the outputs), written out here; an all-ones mask changes nothing."""
    model = model_for("topk")
    ids = torch.tensor([[3, 8, 1, 9], [4, 4, 20, 2]])
    with torch.no_grad():
        cache = model.new_kv_cache(2, max_len=ids.shape[1] + NEW)
        logits = model(ids, kv_cache=cache)
        out = [ids]
        for _ in range(NEW):
            nxt = logits[:, -1].argmax(-1)
            out.append(nxt[:, None])
            logits = model(nxt[:, None], kv_cache=cache)
    want = torch.cat(out, dim=1)
    assert torch.equal(generate(model, ids, NEW, temperature=0), want)
    ones = torch.ones_like(ids)
    assert torch.equal(generate(model, ids, NEW, temperature=0, attention_mask=ones), want)
