"""Lory (causal segment routing + soft expert merging): hand-checked segment weights, a
per-sequence / per-segment loop reference of the merged FFN, accounting of the records, gradients,
causality through the model, refused decoding and bad settings."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from model_checks import assert_causal, assert_checkpointing_keeps_grads, shift_tokens, tiny_lm
from moelab.config import ConfigError
from moelab.layers import MoE
from moelab.layers.routers import LoryRouter
from moelab.model import ModelConfig, TransformerLM, generate
from moelab.model.accounting import accounting

torch.set_num_threads(2)


def _sigmoid(v: float) -> float:
    return 1.0 / (1.0 + math.exp(-v))


def _hand_router(first_segment="uniform"):
    router = LoryRouter(2, 2, 1, segment_len=2, first_segment=first_segment).double()
    with torch.no_grad():
        router.weight.copy_(torch.eye(2))  # logits = the segment mean itself
    return router


# Three segments of 2, 2 and 1 tokens: means (2, 0) and (0, -1) route segments 2 and 3.
X_HAND = torch.tensor([[[1.0, 0.0], [3.0, 0.0], [0.0, 1.0], [0.0, -3.0], [5.0, 5.0]]]).double()


@pytest.mark.parametrize("first_segment", ["uniform", "self"])
def test_hand_checked_segment_weights(first_segment):
    routing = _hand_router(first_segment).route(X_HAND, None)
    # softmax of two logits (a, b) is (σ(a − b), σ(b − a))
    first = [0.5, 0.5] if first_segment == "uniform" else [_sigmoid(2), _sigmoid(-2)]
    want = [first, [_sigmoid(2), _sigmoid(-2)], [_sigmoid(1), _sigmoid(-1)]]
    torch.testing.assert_close(routing.weights_BSE, torch.tensor([want]).double())


def test_pad_tokens_leave_the_segment_mean():
    mask = torch.tensor([[True, True, True, False, False]])
    routing = _hand_router().route(X_HAND, mask)
    # segment 2's mean is its one valid token (0, 1): logits (0, 1)
    want = torch.tensor([_sigmoid(-1), _sigmoid(1)]).double()
    torch.testing.assert_close(routing.weights_BSE[0, 2], want)


def _moe(first_segment="uniform", segment_len=3, **kw):
    torch.manual_seed(0)
    moe = MoE(
        6,
        8,
        3,
        1,
        router="lory",
        segment_len=segment_len,
        first_segment=first_segment,
        init_std=0.5,
        **kw,
    )
    return moe.double()


def _reference(moe, x_BLD, mask_BL=None):
    """The merged FFN written out: per sequence, per segment, a Python loop over the segment's
    valid tokens for the mean and over the experts for the merged weights, then each token
    through the SwiGLU FFN of those weights. Pad tokens get 0."""
    B, L, D = x_BLD.shape
    T, E = moe.router.segment_len, moe.num_experts
    W, w13, w2 = moe.router.weight, moe.experts.w13_EDF2, moe.experts.w2_EFD
    F_ = w2.shape[1]
    out = torch.zeros_like(x_BLD)
    for b in range(B):
        prev_mean = None
        for start in range(0, L, T):
            positions = range(start, min(start + T, L))
            valid = [t for t in positions if mask_BL is None or bool(mask_BL[b, t])]
            mean = sum((x_BLD[b, t] for t in valid), torch.zeros(D).double()) / max(len(valid), 1)
            if prev_mean is None:
                logits = (
                    torch.zeros(E).double()
                    if moe.router.first_segment == "uniform"
                    else (W @ mean).detach()
                )
            else:
                logits = W @ prev_mean
            weights = torch.exp(logits) / torch.exp(logits).sum()
            m13 = sum(weights[e] * w13[e] for e in range(E))
            m2 = sum(weights[e] * w2[e] for e in range(E))
            for t in valid:
                h = x_BLD[b, t] @ m13
                out[b, t] = (F.silu(h[:F_]) * h[F_:]) @ m2
            prev_mean = mean
    return out


@pytest.mark.parametrize("first_segment", ["uniform", "self"])
def test_matches_loop_reference_with_padding_and_a_short_last_segment(first_segment):
    moe = _moe(first_segment)
    x = torch.randn(2, 8, 6).double()  # segments of 3, 3, 2
    mask = torch.ones(2, 8, dtype=torch.bool)
    mask[1, 5:] = False  # right padding inside the second segment
    torch.testing.assert_close(moe(x, token_mask=mask), _reference(moe, x, mask))
    torch.testing.assert_close(moe(x), _reference(moe, x))


def test_records_every_valid_token_on_every_expert():
    moe = _moe().train()
    seen = []
    moe.routing_observer = lambda layer, decision, x_TD: seen.append(decision)
    x = torch.randn(2, 8, 6).double()
    mask = torch.ones(2, 8, dtype=torch.bool)
    mask[0, 6:] = False
    moe(x, token_mask=mask).sum().backward()
    stats, E, n_valid = moe.last_stats, moe.num_experts, 14
    assert int(stats.num_tokens) == n_valid
    assert stats.tokens_per_expert.tolist() == [n_valid] * E
    assert int(stats.active_sum) == E * n_valid == int(stats.assigned)
    assert int(stats.active_min) == int(stats.active_max) == E
    assert int(stats.dropped) == 0 and stats.sparsity == 0.0
    assert moe.aux_losses == {}  # no load-balancing loss: the paper has none
    (decision,) = seen
    per_token = torch.zeros(16).double().index_add_(0, decision.token_idx_N, decision.weight_N)
    want = torch.ones(16).double()
    want[6:8] = 0  # pad tokens: no assignment
    torch.testing.assert_close(per_token, want)


def test_gradients_reach_every_expert_and_the_router():
    moe = _moe().train()
    moe(torch.randn(2, 9, 6).double()).square().sum().backward()
    for grad in (moe.experts.w13_EDF2.grad, moe.experts.w2_EFD.grad):
        assert all(grad[e].abs().sum() > 0 for e in range(moe.num_experts))
    assert moe.router.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("first_segment", ["uniform", "self"])
def test_the_first_segment_gives_the_router_no_gradient(first_segment):
    moe = _moe(first_segment, segment_len=4).train()
    x = torch.randn(2, 8, 6).double().requires_grad_(True)  # two segments, the loss on s_1 only
    moe(x)[:, :4].square().sum().backward()
    grad = moe.router.weight.grad
    assert grad is None or grad.abs().sum() == 0
    assert x.grad.abs().sum() > 0  # the tokens themselves still get a gradient through the FFN


def test_same_parameters_as_a_topk_moe():
    lory, topk = _moe(), MoE(6, 8, 3, 1, router="topk").double()
    assert lory.state_dict().keys() == topk.state_dict().keys()
    lory.load_state_dict(topk.state_dict())


def _lm(first_segment="uniform", ckpt=False):
    return tiny_lm(
        "lory",
        router_options={"segment_len": 4, "first_segment": first_segment},
        n_layers=3,
        max_seq_len=16,
        init_std=0.3,
        activation_checkpointing=ckpt,
    ).double()


@pytest.mark.parametrize("position", [1, 3, 4, 6, 9, 11])
def test_causal_through_the_model(position):
    """Changing token ``position`` (later tokens of the same segment, of later segments) leaves
    every earlier token's logits unchanged."""
    model = _lm().eval()
    torch.manual_seed(1)
    ids = torch.randint(0, 50, (2, 12))
    changed = shift_tokens(ids, position, 50, shift=7, only=True)
    assert_causal(model, ids, changed, atol=1e-7)


def test_paper_first_segment_sees_its_own_later_tokens_and_nothing_else():
    """``first_segment="self"`` (the paper's): a token of the first segment depends on the later
    tokens of that segment (through its merge weights); from the second segment on it is causal."""
    model = _lm("self").eval()
    ids = torch.randint(0, 50, (2, 12))
    changed = shift_tokens(ids, 3, 50, shift=7, only=True)
    assert not torch.allclose(model(ids)[:, :3], model(changed)[:, :3])
    assert_causal(model, ids, shift_tokens(ids, 6, 50, shift=7, only=True), atol=1e-7)


def test_activation_checkpointing_gives_the_same_gradients():
    ids = torch.randint(0, 50, (2, 10))
    assert_checkpointing_keeps_grads(lambda ckpt: _lm(ckpt=ckpt), ids)


def test_kv_cache_decoding_is_refused():
    model = _lm().eval()
    ids = torch.randint(0, 50, (1, 5))
    with pytest.raises(ValueError, match="^router 'lory' cannot decode with a KV cache"):
        model(ids, kv_cache=model.new_kv_cache(1))
    with pytest.raises(ValueError, match="cannot decode with a KV cache"):
        generate(model, ids, max_new_tokens=2)


def test_accounting_counts_one_merged_expert_and_the_amortised_merge():
    model = _lm()
    acc = accounting(model)
    assert acc["total_params"] == sum(p.numel() for p in model.parameters())
    D, E, F_, T = 16, 4, 16, 4
    expert = D * 2 * F_ + F_ * D
    layer = model.cfg.ffn_for(0).accounting(D)
    assert layer["active_params"] == expert + E * D
    assert layer["matmul_active"] == expert
    assert layer["extra_flops"] == D + math.ceil((2 * E * expert + 2 * E * D) / T)


def test_export_to_transformers_is_refused(tmp_path):
    pytest.importorskip("transformers")
    from moelab.hf import export_model

    with pytest.raises(ValueError, match=r"\(block 0\): router 'lory' cannot be exported"):
        export_model(_lm().float(), tmp_path / "out")


def test_bad_settings():
    for bad in (0, -1, 1.5, True):
        want = rf"^segment_len must be a positive integer, got {bad}$"
        with pytest.raises(ValueError, match=want):
            MoE(8, 16, 4, 1, router="lory", segment_len=bad)
    with pytest.raises(
        ValueError, match=r"^first_segment must be one of \('uniform', 'self'\), got 'prev'$"
    ):
        MoE(8, 16, 4, 1, router="lory", first_segment="prev")
    with pytest.raises(ValueError, match="^capacity_factor must be None with router 'lory'"):
        MoE(8, 16, 4, 1, router="lory", capacity_factor=1.0)
    with pytest.raises(ValueError, match="^iterations must be 1 with router 'lory'"):
        MoE(8, 16, 4, 1, router="lory", iterations=2)
    moe = MoE(8, 16, 4, 1, router="lory")
    with pytest.raises(ValueError, match=r"needs x shaped \[batch, seq_len, d_model\].*\(5, 8\)"):
        moe(torch.randn(5, 8))
    with pytest.raises(ValueError, match="routes segments of sequences, not flat tokens"):
        moe.router(torch.randn(5, 8), None)
    with pytest.raises(ConfigError, match="segment_len"):
        ModelConfig.from_dict(
            {
                "vocab_size": 50,
                "d_model": 16,
                "n_layers": 1,
                "n_heads": 2,
                "max_seq_len": 16,
                "ffn": {"kind": "moe", "router": "lory", "router_options": {"segment_len": 0}},
            }
        )


# ---- segment_len against the sequence length (issue: 256 >= 128 silently did not route) ----------


def test_default_segment_len_formula():
    from moelab.layers.routers.lory import default_segment_len

    # a quarter of the sequence, at most the paper's 256, at least 1
    want = {2: 1, 3: 1, 8: 2, 128: 32, 1000: 250, 1024: 256, 4096: 256}
    assert {n: default_segment_len(n) for n in want} == want


def _run_config(*overrides: str):
    from moelab.train.config import resolve_run_config

    return resolve_run_config("topk-tiny", overrides=["model.ffn.router=lory", *overrides])


def test_a_128_token_preset_derives_a_segment_len_and_the_router_learns():
    """No segment_len set: the model gets 32 (four segments of the 128-token rows), config.yaml
    keeps it unset, and one training step gives the router a gradient (with 256 it got none)."""
    cfg = _run_config()
    assert cfg.model.ffn.router_options == {}
    assert cfg.model.ffn_for(0).router_options == {"segment_len": 32}
    assert "router_options" not in cfg.model.to_dict()["ffn"]
    torch.manual_seed(0)
    model = TransformerLM(cfg.model).train()
    assert {b.ffn.router.segment_len for b in model.blocks} == {32}
    ids = torch.randint(0, cfg.model.vocab_size, (1, cfg.data.seq_len))
    model(ids).logsumexp(-1).sum().backward()
    assert all(b.ffn.router.weight.grad.abs().sum() > 0 for b in model.blocks)


@pytest.mark.parametrize(
    "overrides, valid, where",
    [
        (["model.ffn.router_options.segment_len=256"], 127, "max_seq_len=128"),
        (["model.ffn.router_options.segment_len=128"], 127, "max_seq_len=128"),
        (["model.ffn.router_options.segment_len=64", "data.seq_len=64"], 63, "data.seq_len=64"),
    ],
)
def test_a_segment_len_that_leaves_one_segment_is_refused(overrides, valid, where):
    want = (
        rf"^model\.ffn\.router_options\.segment_len: must be an integer in \[1, {valid}\] "
        rf"\(below {where}: with one segment per sequence the router never learns"
    )
    with pytest.raises(ConfigError, match=want):
        _run_config(*overrides)


def test_a_derived_segment_len_too_long_for_the_data_says_it_was_derived():
    with pytest.raises(ConfigError, match=r"got 256 \(the value derived from max_seq_len=4096"):
        _run_config("model.max_seq_len=4096")  # data.seq_len stays 128
    assert _run_config("model.max_seq_len=4096", "model.ffn.router_options.segment_len=32")


def test_a_training_forward_of_one_segment_is_refused_at_the_layer():
    moe = MoE(8, 16, 4, 1, router="lory")  # the layer's default: the paper's 256
    x = torch.randn(2, 128, 8)
    with pytest.raises(ValueError, match=r"^segment_len \(256\) must be below the sequence length"):
        moe.train()(x)
    with torch.no_grad():  # evaluation of short sequences is fine
        moe.eval()(x)
