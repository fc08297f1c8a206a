"""KV-cached decoding: exact against full recompute; greedy, nucleus, seeds, EOS."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from moelab.model import ModelConfig, TransformerLM, generate
from moelab.model.generate import greedy_ids, nucleus_filter, sample_next

HAS_MOE = importlib.util.find_spec("moelab.layers.moe") is not None


def model_for(ffn: dict | None = None, **kw) -> TransformerLM:
    base = dict(vocab_size=40, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=24)
    base.update(kw)
    torch.manual_seed(0)
    # a larger init than the paper's so that logits are far from uniform and argmax is stable
    return TransformerLM(ModelConfig(**base, ffn=ffn or {}, init_std=0.2)).double().eval()


def prompt(batch: int = 2, length: int = 5) -> torch.Tensor:
    return torch.randint(0, 40, (batch, length), generator=torch.Generator().manual_seed(1))


FFNS = [{"kind": "dense"}]
if HAS_MOE:
    FFNS.append({"kind": "moe", "num_experts": 4, "top_k": 2})


@pytest.mark.parametrize("ffn", FFNS, ids=lambda f: f["kind"])
def test_cached_incremental_logits_equal_full_recompute(ffn):
    model = model_for(ffn)
    x = torch.randint(0, 40, (2, 12), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        full = model(x)
        cache = model.new_kv_cache(2)
        # a prompt, single tokens, then a multi-token chunk on top of a filled cache
        pieces = [x[:, :5], x[:, 5:6], x[:, 6:7], x[:, 7:10], x[:, 10:11], x[:, 11:12]]
        logits = torch.cat([model(p, kv_cache=cache) for p in pieces], dim=1)
    assert cache.length == 12
    torch.testing.assert_close(logits, full, rtol=1e-10, atol=1e-10)


def test_kv_cache_overflow_is_an_error():
    model = model_for()
    cache = model.new_kv_cache(1, max_len=4)
    model(prompt(1, 3), kv_cache=cache)
    with pytest.raises(ValueError, match="KV cache holds 4 positions"):
        model(prompt(1, 2), kv_cache=cache)


def test_greedy_equals_argmax_of_full_recompute():
    model = model_for()
    seq = prompt()
    out = generate(model, seq, max_new_tokens=8, temperature=0)
    ref = seq
    with torch.no_grad():
        for _ in range(8):
            nxt = model(ref)[:, -1].argmax(-1, keepdim=True)
            ref = torch.cat([ref, nxt], dim=1)
    assert torch.equal(out, ref)
    assert out.shape == (2, 13)


def test_one_dimensional_prompt():
    model = model_for()
    out = generate(model, prompt(1)[0], max_new_tokens=3, temperature=0)
    assert out.shape == (8,)
    assert torch.equal(out, generate(model, prompt(1), 3, temperature=0)[0])


def test_sampling_is_seeded_and_tiny_top_p_is_greedy():
    model = model_for()
    a = generate(model, prompt(), 8, temperature=1.0, seed=3)
    b = generate(model, prompt(), 8, temperature=1.0, seed=3)
    assert torch.equal(a, b)
    greedy = generate(model, prompt(), 8, temperature=0)
    nucleus = generate(model, prompt(), 8, temperature=1.0, top_p=1e-9, seed=4)
    assert torch.equal(greedy, nucleus)


def test_nucleus_keeps_only_the_top_mass():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    g = torch.Generator().manual_seed(0)
    draws = {int(sample_next(logits, 1.0, 0.8, g)) for _ in range(200)}
    assert draws == {0, 1}  # 0.5 + 0.3 reaches 0.8; the tail is cut
    draws = {int(sample_next(logits, 1.0, 0.81, g)) for _ in range(300)}
    assert draws == {0, 1, 2}


def test_nucleus_boundary_does_not_drift_over_a_large_vocabulary():
    """Over 100,000 equal tokens a float32 running sum drifts by far more than one token's mass;
    the kept count must be the exact one: tokens whose predecessors' mass is below top_p."""
    vocab = 100_000
    probs = torch.softmax(torch.zeros(1, vocab), dim=-1)
    q = float(probs[0, 0])
    for top_p in (0.5, 0.9, 0.999):
        expected = sum(1 for i in range(vocab) if i * q < top_p)
        assert int((nucleus_filter(probs, top_p) > 0).sum()) == expected


def test_eos_stops_and_pads():
    model = model_for()
    first = generate(model, prompt(), 1, temperature=0)[:, -1]
    eos = int(first[0])
    out = generate(model, prompt(1), 6, temperature=0, eos_id=eos)
    assert out.shape == (1, 6) and int(out[0, -1]) == eos  # stopped right after EOS
    out = generate(model, prompt(), 6, temperature=0, eos_id=eos)
    row0 = out[0, 5:]
    assert bool((row0 == eos).all())  # finished sequences keep emitting EOS


def test_generate_restores_training_mode_and_validates():
    model = model_for().train()
    generate(model, prompt(), 2, temperature=0)
    assert model.training
    with pytest.raises(ValueError, match="exceeds max_seq_len=24"):
        generate(model, prompt(), 20)
    with pytest.raises(ValueError, match="top_p"):
        generate(model, prompt(), 2, top_p=0.0)
    with pytest.raises(ValueError, match="temperature"):
        generate(model, prompt(), 2, temperature=-1.0)


@pytest.mark.parametrize("V", [8192, 1000, 256])
def test_greedy_ids_equal_argmax_with_ties_inf_and_nan(V: int) -> None:
    """The two-pass greedy pick must return argmax's ids exactly: the first maximum of a row on
    ties (also ties across blocks), +inf, a row of -inf, and the first NaN where a row has NaNs."""
    g = torch.Generator().manual_seed(V)
    x = torch.randn(9, V, generator=g)
    x[1, [5, V - 3]] = 9.0  # tie: two blocks apart, the first wins
    x[2, [V // 2, V // 2 + 1]] = 9.0  # tie inside a block
    x[3, V - 1] = float("inf")
    x[4] = float("-inf")
    x[5, [7, V - 2]] = float("nan")  # the first NaN wins, as argmax picks it
    x[6, V - 1] = float("nan")
    x[7] = torch.randint(-2, 3, (V,), generator=g).float()  # most entries tie
    assert torch.equal(greedy_ids(x), x.argmax(dim=-1))
    assert torch.equal(greedy_ids(x[:1]), x[:1].argmax(dim=-1))
