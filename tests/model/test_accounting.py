"""Parameter / FLOP accounting against numbers worked out by hand on tiny configs."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from moelab.config import ConfigError
from moelab.layers.routers import ROUTERS
from moelab.model import ModelConfig, MoEConfig, PEERConfig, PKMConfig, TransformerLM, accounting

HAS_MOE = importlib.util.find_spec("moelab.layers.moe") is not None

# V=10, D=8, one block, H=2 query heads, G=1 kv head (head dim 4), L=4, SwiGLU d_hidden=16.
TINY = dict(vocab_size=10, d_model=8, n_layers=1, n_heads=2, n_kv_heads=1, max_seq_len=4)


def test_dense_by_hand():
    cfg = ModelConfig(**TINY, ffn={"kind": "dense", "d_hidden": 16})
    acc = accounting(cfg)
    # embeddings 10*8 + head 10*8 = 160; attention wq 64 + wk 32 + wv 32 + wo 64 = 192;
    # norms 3*8 = 24; SwiGLU 8*32 + 16*8 = 384
    assert acc["total_params"] == 160 + 192 + 24 + 384 == 760
    assert acc["active_params"] == 760 and acc["active_params_non_embedding"] == 600
    t = acc["by_type"]
    assert t["embeddings"]["flops_per_token"] == 2 * 80  # the head only
    assert t["attention"]["flops_per_token"] == 2 * 192 + 4 * 4 * 8  # matmuls + scores at L=4
    assert t["dense_ffn"]["flops_per_token"] == 2 * 384
    assert acc["flops_per_token"] == 160 + 512 + 768 == 1440
    assert set(t) == {"embeddings", "attention", "norms", "dense_ffn"}


def test_tied_embeddings_count_once():
    acc = accounting(
        ModelConfig(**TINY, tie_embeddings=True, ffn={"kind": "dense", "d_hidden": 16})
    )
    assert acc["total_params"] == 760 - 80
    assert acc["flops_per_token"] == 1440  # the head matmul still runs


def test_moe_by_hand_with_granularity_and_shared_expert():
    ffn = MoEConfig(d_hidden=16, num_experts=4, top_k=2, granularity=2, shared_experts=1)
    a = ModelConfig(**TINY, ffn=ffn).ffn_for(0).accounting(8)
    # 8 fine experts of width 8: 8*16 + 8*8 = 192 each; router 8*8 = 64; shared (width 8) 192
    assert a["total_params"] == 8 * 192 + 64 + 192 == 1792
    assert a["active_params"] == 4 * 192 + 64 + 192 == 1024  # top_k*G = 4 fine experts


def test_relu_router_counts_the_target_k():
    topk = ModelConfig(**TINY, ffn={"kind": "moe", "d_hidden": 16, "num_experts": 4, "top_k": 1})
    relu = ModelConfig.from_dict(topk.to_dict(), ["ffn.router=relu"])
    assert accounting(relu) == accounting(topk)
    # one active expert of 384 params + router 32 out of four
    assert accounting(topk)["by_type"]["moe"]["active_params"] == 384 + 32
    assert accounting(topk)["by_type"]["moe"]["total_params"] == 4 * 384 + 32


def test_peer_by_hand():
    ffn = PEERConfig(num_experts=16, heads=2, top_k=3, d_key=4)
    a = ModelConfig(**TINY, ffn=ffn).ffn_for(0).accounting(8)
    # experts 16 * (down 8 + up 8) = 256; queries 2*8*4 = 64; BN 2*2*4 = 16; keys 2*4*(4/2) = 16
    assert a["total_params"] == 256 + 64 + 16 + 16
    assert a["active_params"] == 2 * 3 * 16 + 64 + 16 == 176
    # 2*(96 + 64) matmul + per head (2*sqrt(16)*4 sub-key scores + 3*3 candidate sums)
    acc = accounting(ModelConfig(**TINY, ffn=ffn))
    assert acc["by_type"]["peer"]["flops_per_token"] == 2 * 160 + 2 * (32 + 9) == 402


def test_pkm_by_hand():
    ffn = PKMConfig(num_memories=16, heads=2, top_k=3, d_key=4, query_batchnorm=False)
    a = ModelConfig(**TINY, ffn=ffn).ffn_for(0).accounting(8)
    # values 16*8 = 128; queries 64; sub-keys per head 2 * 4 * 2 = 16 -> 32
    assert a["total_params"] == 128 + 64 + 32
    assert a["active_params"] == 2 * 3 * 8 + 64 == 112
    acc = accounting(ModelConfig(**TINY, ffn=ffn))
    assert acc["by_type"]["pkm"]["flops_per_token"] == 2 * 112 + 2 * (32 + 9)


def test_mixed_layers_split_by_type():
    cfg = ModelConfig.from_dict(
        {
            **TINY,
            "n_layers": 3,
            "ffn": {"kind": "peer", "num_experts": 16, "heads": 2, "top_k": 3, "d_key": 4},
            "ffn_layers": "middle",
            "dense_d_hidden": 16,
        }
    )
    t = accounting(cfg)["by_type"]
    assert t["dense_ffn"]["layers"] == 2 and t["dense_ffn"]["total_params"] == 2 * 384
    assert t["peer"]["layers"] == 1 and t["attention"]["layers"] == 3
    assert t["norms"]["total_params"] == 7 * 8


@pytest.mark.parametrize(
    "ffn",
    [
        {"kind": "dense", "d_hidden": 16},
        {"kind": "dense", "d_hidden": 16, "activation": "gelu"},
        pytest.param(
            {
                "kind": "moe",
                "d_hidden": 16,
                "num_experts": 4,
                "top_k": 2,
                "granularity": 2,
                "shared_experts": 1,
            },
            marks=pytest.mark.skipif(not HAS_MOE, reason="moelab.layers.moe not there yet"),
        ),
    ],
    ids=["swiglu", "gelu", "moe"],
)
@pytest.mark.parametrize("tie", [False, True])
def test_config_totals_match_a_built_model(ffn, tie):
    cfg = ModelConfig(**{**TINY, "n_layers": 2}, tie_embeddings=tie, ffn=ffn)
    model = TransformerLM(cfg)
    from_cfg, from_model = accounting(cfg), accounting(model)
    assert from_cfg["total_params"] == model.num_params() == from_model["total_params"]
    assert from_cfg == from_model


# Layer variants every router is counted under (a router that refuses one is skipped for it):
# plain, Chain-of-Experts (a router per pass), and fine-grained + gated shared experts on
# non-adjacent MoE blocks (dense blocks in between).
ROUTER_VARIANTS = {
    "plain": ({}, {}),
    "chain": ({"iterations": 2}, {}),
    "fine_shared_sparse": (
        {"granularity": 2, "top_k": 1, "shared_experts": 1, "shared_gate": True},
        {"ffn_layers": [0, 2], "dense_d_hidden": 16},
    ),
}


@pytest.mark.parametrize("variant", sorted(ROUTER_VARIANTS))
@pytest.mark.parametrize("router", sorted(ROUTERS))
def test_config_totals_match_the_built_model_for_every_router(router, variant):
    """Config-only accounting (what ``--print-config`` shows before anything is built) counts
    exactly the parameters the built model has, whatever the router holds: extra gate rows (null,
    MoE++), zero-computation experts' vectors (MoE++), no gate at all (hash), parameters shared by
    every layer (RMoE's GRU, once per model)."""
    ffn_extra, model_extra = ROUTER_VARIANTS[variant]
    ffn = {"kind": "moe", "d_hidden": 16, "num_experts": 4, "top_k": 2, "router": router}
    try:
        cfg = ModelConfig(**{**TINY, "n_layers": 3}, **model_extra, ffn={**ffn, **ffn_extra})
    except ConfigError as err:
        pytest.skip(f"{router} does not take this variant: {err}")
    torch.manual_seed(0)
    model = TransformerLM(cfg)
    from_cfg, from_model = accounting(cfg), accounting(model)
    assert from_cfg["total_params"] == model.num_params()
    assert "unclassified_params" not in from_model
    assert from_cfg == from_model


def test_rmoe_gru_counted_once_in_parameters_and_per_layer_in_flops():
    """RMoE's GRU is one set of tensors for the whole model, run by every layer: total and active
    parameters count it once, the FLOPs once per layer that runs it."""
    h, L = 4, 3
    gru = 2 * 3 * h * h + 2 * 3 * h  # w_ih, w_hh, b_ih, b_hh
    ffn = {"kind": "moe", "d_hidden": 16, "num_experts": 4, "top_k": 1}
    topk = ModelConfig(**{**TINY, "n_layers": L}, ffn=ffn)
    rmoe = ModelConfig(
        **{**TINY, "n_layers": L},
        ffn={**ffn, "router": "rmoe", "router_options": {"hidden_dim": h}},
    )
    t, r = accounting(topk)["by_type"]["moe"], accounting(rmoe)["by_type"]["moe"]
    # per layer: the [E, D] gate becomes a projector [h, D] and a gate [E, h]
    per_layer = h * 8 + 4 * h - 4 * 8
    assert r["total_params"] == t["total_params"] + L * per_layer + gru
    assert r["active_params"] == t["active_params"] + L * per_layer + gru
    assert r["flops_per_token"] == t["flops_per_token"] + 2 * L * (per_layer + gru)
    assert accounting(rmoe)["total_params"] == TransformerLM(rmoe).num_params()
