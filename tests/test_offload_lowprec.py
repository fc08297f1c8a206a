"""Low-precision experts on a miss (moelab.serve.lowprec, HOBBIT): threshold 0 is the plain
offloaded model exactly; with the copies in use the logits equal a differently computed reference
(the loaded model with exactly the experts that ran in low precision replaced by their
dequantized weights); one expert's error stays within a bound derived from int8's rounding; the
copies' measured bytes sit inside the budget; bad values are one line before any work."""

from __future__ import annotations

import sys

import pytest
import torch
import torch.nn.functional as F

from moelab.model import TransformerLM, generate
from moelab.serve import offload_model
from run_fixtures import one_torch_thread  # noqa: F401
from test_offload import PROMPT, offloaded, preset_model, saved

IDS = torch.randint(0, 64, (2, 10), generator=torch.Generator().manual_seed(1))
SILU_LIPSCHITZ = 1.0999  # max |silu'(x)| (at x ≈ 2.4): silu moves at most this much per unit


def top2() -> TransformerLM:
    return preset_model("topk-tiny", top_k=2)  # a second expert per token, with a smaller gate


def served(model: TransformerLM, weights, memory="60%", **kw) -> TransformerLM:
    return offloaded(model, weights, memory, **kw)


def test_threshold_zero_is_the_plain_offloaded_model_exactly(tmp_path):
    model = top2()
    weights = saved(model, tmp_path)
    plain = served(model, weights)
    low = served(model, weights, miss_precision="int8", miss_threshold=0.0)
    with torch.no_grad():
        assert torch.equal(low(IDS), plain(IDS))
    assert torch.equal(generate(low, PROMPT, 12, temperature=0), generate(plain, PROMPT, 12, 0))
    stats = low.offload.stats()
    assert stats["lowprec_hits"] == 0 and stats["misses"] > 0
    assert low.offload.cache.budget == low.offload.budget - stats["lowprec_bytes"] > 0


def test_logits_equal_the_loaded_model_with_exactly_those_experts_dequantized(tmp_path):
    model = top2()
    weights = saved(model, tmp_path)
    low = served(model, weights, "70%", miss_precision="int8", miss_threshold=1.0)
    with torch.no_grad():
        got = low(IDS)
        session = low.offload
        used = session.lowprec_used
        assert session.stats()["lowprec_hits"] == len(used) > 0
        reference = TransformerLM(model.cfg).eval()
        reference.load_state_dict(model.state_dict())
        blocks = [i for i, b in enumerate(model.blocks) if hasattr(b.ffn, "experts")]
        for layer, e in used:
            w13, w2 = session.lowprec.dequantized(layer, e)
            experts = reference.blocks[blocks[layer]].ffn.experts
            experts.w13_EDF2[e] = w13
            experts.w2_EFD[e] = w2
        want = reference(IDS)
        full = model(IDS)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # the copies really ran: int8's change of the logits is far above the reference's rounding
    assert (got - full).abs().max() > 10 * (got - want).abs().max()


def int8_bound(x_nD, w13, w2, q13, q2, s13, s2, group):
    """|y_int8 - y_full| <= this, elementwise, from |Δw| <= scale/2 per weight (symmetric
    rounding): Δh <= |x| @ S13/2; SwiGLU u = silu(a)·b, so Δu <= |silu(a')|·Δb + (|b'| + Δb)·L·Δa
    with L = max|silu'|; Δy <= Δu @ |W2'| + (|u'| + Δu) @ S2/2. Primes: the int8 expert."""
    S13 = s13.repeat_interleave(group, dim=1).t() / 2  # [D, 2F], per-weight rounding bound
    S2 = s2.repeat_interleave(group, dim=1).t() / 2  # [F, D]
    dh = x_nD.abs() @ S13
    h = x_nD @ q13
    a, b = h.chunk(2, dim=-1)
    da, db = dh.chunk(2, dim=-1)
    u = F.silu(a) * b
    du = F.silu(a).abs() * db + (b.abs() + db) * SILU_LIPSCHITZ * da
    return du @ q2.abs() + (u.abs() + du) @ S2


def test_one_experts_int8_error_stays_within_the_derived_bound(tmp_path):
    model = top2()
    weights = saved(model, tmp_path)
    low = served(model, weights, miss_precision="int8")
    copies = low.offload.lowprec
    bank, group = copies.layers[1].low, copies.layers[1].group
    x = torch.randn(5, 16, generator=torch.Generator().manual_seed(2))
    gates = torch.rand(5, generator=torch.Generator().manual_seed(3))
    experts = model.blocks[1].ffn.experts
    for e in (0, 5):
        w13, w2 = experts.w13_EDF2[e].detach(), experts.w2_EFD[e].detach()
        q13, q2 = copies.dequantized(1, e)
        s13, s2 = bank.w13_scale[e], bank.w2_scale[e]
        for w, q, s in ((w13, q13, s13), (w2, q2, s2)):  # the rounding the bound assumes
            half = s.repeat_interleave(group, dim=1).t() / 2
            assert ((q - w).abs() <= half * (1 + 1e-4)).all()  # float32 rounding of s/2
        with torch.no_grad():
            got = copies.run(1, e, x, gates)
            full = (F.silu(x @ w13[:, :16]) * (x @ w13[:, 16:])) @ w2 * gates[:, None]
        bound = int8_bound(x, w13, w2, q13, q2, s13, s2, group) * gates[:, None] * (1 + 1e-4)
        err = (got - full).abs()
        assert (err <= bound + 1e-9).all()  # 1e-9: float rounding, far below the outputs
        assert err.max() > 0 and bound.max() < 0.5 * full.abs().max()  # not vacuous


def test_copies_and_cache_never_exceed_the_budget(tmp_path):
    model = top2()
    weights = saved(model, tmp_path)
    fresh = TransformerLM(model.cfg).eval()
    session = offload_model(
        fresh, weights, "45%", load_resident=True, miss_precision="int8", miss_threshold=0.9
    )
    # int8 per weight plus one float32 scale per group of 16, for w13 [16, 32] and w2 [16, 16]
    per_expert = (16 * 32 + 16 * 16) * (1 + 4 / 16)
    assert session.lowprec_bytes == 3 * 8 * per_expert
    copies = sum(b.numel() * b.element_size() for q in session.lowprec.layers for b in q.buffers())
    held = []
    session.cache.on_change = lambda c: held.append(
        copies + sum(t.numel() * t.element_size() for e in c.entries.values() for t in e.tensors)
    )
    generate(fresh, PROMPT, 12, temperature=0)
    stats = session.stats()
    assert len(held) == stats["misses"] > 5 and stats["lowprec_hits"] > 0
    assert max(held) <= session.budget and stats["peak_bytes"] <= stats["budget_bytes"]
    assert stats["bytes_saved"] == stats["lowprec_hits"] * session.expert_bytes[0]


def test_bad_values_are_one_line_before_any_work(tmp_path, monkeypatch):
    model = top2()
    weights = saved(model, tmp_path)
    cases = [
        ({"miss_precision": "int2"}, "--miss-precision: must be one of int8, int4, got 'int2'"),
        ({"miss_precision": "int8", "miss_threshold": 1.5}, "--miss-threshold: must be a number"),
        ({"miss_precision": "int8", "miss_threshold": -0.1}, "--miss-threshold: must be a number"),
        ({"miss_precision": "int4"}, "--miss-precision: int4 needs a group size from"),
        ({"miss_precision": "int8", "expert_memory": "20%"}, "cannot hold the int8 copies"),
    ]
    for kwargs, message in cases:
        target = TransformerLM(model.cfg)
        with pytest.raises(ValueError, match=message) as err:
            offload_model(target, weights, **({"expert_memory": "60%"} | kwargs))
        assert "\n" not in str(err.value)
        assert target.blocks[0].ffn.experts.w13_EDF2.numel() > 0  # nothing was changed
    monkeypatch.setitem(sys.modules, "torchao", None)  # as if the extra were not installed
    monkeypatch.setitem(sys.modules, "torchao.quantization", None)
    with pytest.raises(ValueError, match=r"need torchao, the 'compress' extra \(pip install"):
        offload_model(TransformerLM(model.cfg), weights, "60%", miss_precision="int8")


@pytest.mark.parametrize("batch", [1, 3])
def test_short_step_with_copies_equals_the_general_path(batch, tmp_path, monkeypatch):
    """`generate`'s short decode step serves HOBBIT's misses from their copies as the layer's
    general forward does: the same experts in low precision, the same reads, the same logits (to
    float rounding: a matmul pair per expert against the shell's grouped call), for one row and
    a left-padded batch; and the copies really ran (else the test would prove nothing)."""
    from moelab.serve.hook import OffloadDispatcher
    from test_offload_decode import prompt_batch, step_logits

    model = top2()
    weights = saved(model, tmp_path)
    ids, pad_B = prompt_batch(batch)

    general_calls = []
    run = OffloadDispatcher.run
    monkeypatch.setattr(
        OffloadDispatcher, "run", lambda self, *a: general_calls.append(1) or run(self, *a)
    )
    runs = {}
    for fast in (False, True):
        general_calls.clear()
        low = served(model, weights, "40%", miss_precision="int8", miss_threshold=1.0)
        logits = step_logits(low, ids, pad_B, fast=fast)
        runs[fast] = (logits, low.offload.stats(), set(low.offload.lowprec_used))
        low.offload.close()
        layers = len(model.blocks)
        assert len(general_calls) == layers * (1 if fast else 1 + len(logits))  # prefill only
    (general, g_stats, g_used), (short, s_stats, s_used) = runs[False], runs[True]
    assert s_stats["lowprec_hits"] > 0 and s_used == g_used
    for key in ("lowprec_hits", "misses", "hits", "bytes_read"):
        assert s_stats[key] == g_stats[key], key
    for want, have in zip(general, short, strict=True):
        torch.testing.assert_close(have, want, rtol=1e-5, atol=1e-5)
