"""TransformerLM: shapes, causality, GQA, RoPE, tying, checkpointing, the FFN slot."""

from __future__ import annotations

import importlib.util
import math

import pytest
import torch
from torch import nn

from model_checks import assert_causal, assert_checkpointing_keeps_grads, shift_tokens
from moelab.layers.dense import DenseFFN
from moelab.model import ModelConfig, TransformerLM
from moelab.model.transformer import apply_rope, rope_tables

HAS_MOE = importlib.util.find_spec("moelab.layers.moe") is not None
needs_moe = pytest.mark.skipif(not HAS_MOE, reason="moelab.layers.moe has not landed yet")


def tiny_cfg(**kw) -> ModelConfig:
    base = dict(vocab_size=50, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=16)
    base.update(kw)
    return ModelConfig(**base)


def ids(batch: int = 2, length: int = 10, vocab: int = 50, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


def test_logits_shape_and_dtype():
    torch.manual_seed(0)
    model = TransformerLM(tiny_cfg())
    logits = model(ids())
    assert logits.shape == (2, 10, 50) and logits.dtype == torch.float32
    assert torch.isfinite(logits).all()


def test_causal_future_tokens_do_not_change_past_logits():
    torch.manual_seed(0)
    model = TransformerLM(tiny_cfg()).double()
    x = ids()
    assert_causal(model, x, shift_tokens(x, 6, 50, only=True))


def test_gqa_equals_mha_with_repeated_kv_heads():
    torch.manual_seed(0)
    gqa = TransformerLM(tiny_cfg(n_kv_heads=2)).double()
    mha = TransformerLM(tiny_cfg(n_kv_heads=4)).double()
    group, hd = 4 // 2, 32 // 4
    state = gqa.state_dict()
    for name, w in list(state.items()):
        if name.endswith(("attn.wk.weight", "attn.wv.weight")):  # [G*hd, D] -> [H*hd, D]
            state[name] = w.view(2, hd, 32).repeat_interleave(group, dim=0).reshape(4 * hd, 32)
    mha.load_state_dict(state)
    x = ids()
    torch.testing.assert_close(gqa(x), mha(x), rtol=1e-12, atol=1e-12)


def test_rope_scores_depend_only_on_relative_position():
    hd = 16
    cos, sin = rope_tables(hd, 64, base=1e6)
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 1, 1, hd, dtype=torch.float64, generator=g)
    k = torch.randn(1, 1, 1, hd, dtype=torch.float64, generator=g)

    def score(m: int, n: int) -> float:
        qm = apply_rope(q, cos[m : m + 1], sin[m : m + 1])
        kn = apply_rope(k, cos[n : n + 1], sin[n : n + 1])
        return float((qm * kn).sum())

    for m, n, shift in [(3, 1, 7), (10, 10, 20), (0, 5, 40)]:
        assert math.isclose(score(m, n), score(m + shift, n + shift), rel_tol=1e-10, abs_tol=1e-12)
    assert not math.isclose(score(3, 1), score(3, 2), rel_tol=1e-6)
    # position 0 is the identity; norms are preserved everywhere
    torch.testing.assert_close(apply_rope(q, cos[:1], sin[:1]), q)
    assert math.isclose(float(apply_rope(q, cos[9:10], sin[9:10]).norm()), float(q.norm()))


def test_tied_vs_untied_parameter_counts():
    untied = TransformerLM(tiny_cfg())
    tied = TransformerLM(tiny_cfg(tie_embeddings=True))
    assert untied.num_params() - tied.num_params() == 50 * 32
    assert tied.lm_head.weight is tied.tok_emb.weight
    assert untied.lm_head.weight is not untied.tok_emb.weight


def test_no_biases_and_init_std():
    torch.manual_seed(0)
    cfg = tiny_cfg(d_model=64, n_layers=8, n_heads=4, vocab_size=512)
    model = TransformerLM(cfg).requires_grad_(False)
    assert not [n for n, _ in model.named_parameters() if "bias" in n]
    out_std = 0.01 / math.sqrt(2 * 8)
    wq = torch.cat([b.attn.wq.weight.flatten() for b in model.blocks])
    wo = torch.cat([b.attn.wo.weight.flatten() for b in model.blocks])
    w2 = torch.cat([b.ffn.w2_FD.flatten() for b in model.blocks])
    assert abs(float(model.tok_emb.weight.std()) / 0.01 - 1) < 0.05
    assert abs(float(wq.std()) / 0.01 - 1) < 0.05
    assert abs(float(wo.std()) / out_std - 1) < 0.05
    assert abs(float(w2.std()) / out_std - 1) < 0.05
    plain = TransformerLM(ModelConfig(**{**cfg.to_dict(), "scaled_residual_init": False}))
    plain.requires_grad_(False)
    assert abs(float(plain.blocks[0].attn.wo.weight.std()) / 0.01 - 1) < 0.1


def test_dense_slot_and_mixed_layers():
    cfg = tiny_cfg(n_layers=3, dense_d_hidden=24, ffn={"kind": "dense", "d_hidden": 40})
    cfg = ModelConfig.from_dict({**cfg.to_dict(), "ffn_layers": "middle"})
    model = TransformerLM(cfg)
    widths = [b.ffn.d_hidden for b in model.blocks]
    assert widths == [24, 40, 24] and all(isinstance(b.ffn, DenseFFN) for b in model.blocks)
    assert model.routed_layers() == []


class SpyFFN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.seen: list = []

    def forward(self, x, token_mask=None, context=None):
        self.seen.append(token_mask)
        return torch.zeros_like(x)


def test_token_mask_reaches_the_ffn_slot():
    model = TransformerLM(tiny_cfg())
    spy = SpyFFN()
    model.blocks[1].ffn = spy
    mask = torch.ones(2, 10, dtype=torch.bool)
    mask[1, 7:] = False
    model(ids(), token_mask=mask)
    assert spy.seen[-1] is mask
    model(ids())
    assert spy.seen[-1] is None
    with pytest.raises(ValueError, match="token_mask must have the shape of input_ids"):
        model(ids(), token_mask=mask[:, :5])


def test_too_long_sequence_is_an_error():
    model = TransformerLM(tiny_cfg())
    with pytest.raises(ValueError, match="exceeds max_seq_len=16"):
        model(ids(length=17))


@pytest.mark.parametrize(
    "kind", ["dense", pytest.param("topk", marks=needs_moe), pytest.param("relu", marks=needs_moe)]
)
def test_activation_checkpointing_gives_identical_outputs_and_grads(kind):
    """Recompute-safe routing: the recomputed forward routes exactly as the first one did."""
    ffn = {"kind": "dense"}
    if kind != "dense":
        ffn = {"kind": "moe", "num_experts": 4, "top_k": 2, "router": kind}
    cfg = ModelConfig.from_dict({**tiny_cfg().to_dict(), "ffn": ffn})

    def build(checkpointing: bool) -> TransformerLM:
        torch.manual_seed(0)
        flag = f"activation_checkpointing={str(checkpointing).lower()}"
        return TransformerLM(cfg.with_overrides([flag])).double()

    def loss(model: TransformerLM, logits: torch.Tensor) -> torch.Tensor:
        aux = [sum(layer.aux_losses.values()) for layer in model.routed_layers()]
        return logits.logsumexp(-1).mean() + sum(aux)

    assert_checkpointing_keeps_grads(build, ids(), loss=loss, rtol=1e-12, atol=1e-14)


@needs_moe
def test_one_expert_moe_model_equals_dense_model():
    from moelab.layers.moe import MoE

    base = tiny_cfg().to_dict()
    dense_cfg = ModelConfig.from_dict({**base, "ffn": {"kind": "dense", "d_hidden": 24}})
    moe_cfg = ModelConfig.from_dict(
        {**base, "ffn": {"kind": "moe", "d_hidden": 24, "num_experts": 1, "top_k": 1}}
    )
    torch.manual_seed(0)
    dense = TransformerLM(dense_cfg).double()
    moe = TransformerLM(moe_cfg).double()
    assert all(isinstance(layer, MoE) for layer in moe.routed_layers())
    assert len(moe.routed_layers()) == 2
    state = {}
    for name, w in dense.state_dict().items():
        if name.endswith("ffn.w13_DF2"):
            state[name.replace("ffn.w13_DF2", "ffn.experts.w13_EDF2")] = w[None]
        elif name.endswith("ffn.w2_FD"):
            state[name.replace("ffn.w2_FD", "ffn.experts.w2_EFD")] = w[None]
        else:
            state[name] = w
    missing, unexpected = moe.load_state_dict(state, strict=False)
    assert not unexpected and all("router" in n for n in missing)

    x = ids()
    a, b = dense(x), moe(x)
    torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    a.square().mean().backward()
    b.square().mean().backward()
    g_dense = dict(dense.named_parameters())
    for name, p in moe.named_parameters():
        if "router" in name:
            continue
        ref = name.replace("experts.w13_EDF2", "w13_DF2").replace("experts.w2_EFD", "w2_FD")
        torch.testing.assert_close(p.grad.reshape(g_dense[ref].shape), g_dense[ref].grad, msg=name)


@needs_moe
def test_moe_routing_excludes_padding():
    cfg = ModelConfig.from_dict(
        {**tiny_cfg().to_dict(), "ffn": {"kind": "moe", "num_experts": 4, "top_k": 2}}
    )
    model = TransformerLM(cfg).train()
    mask = torch.ones(2, 10, dtype=torch.bool)
    mask[0, 6:] = False
    model(ids(), token_mask=mask)
    for layer in model.routed_layers():
        assert int(layer.last_stats.num_tokens) == 16


def test_bfloat16_model_keeps_float32_rope_tables():
    torch.manual_seed(0)
    model = TransformerLM(tiny_cfg())
    ref = model(ids())
    model = model.to(torch.bfloat16)
    assert model._rope_cos.dtype == torch.float32
    logits = model(ids())
    assert logits.dtype == torch.bfloat16
    torch.testing.assert_close(logits.float(), ref, rtol=0.05, atol=0.05)
