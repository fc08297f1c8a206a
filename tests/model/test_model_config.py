"""ModelConfig and the per-kind FFN configs: defaults, round trips, options, validation errors."""

from __future__ import annotations

import dataclasses

import pytest

from moelab.model import DenseConfig, ModelConfig, MoEConfig, auto_d_hidden
from moelab.model.ffn_configs import FFN_KINDS


def tiny(**kw) -> dict:
    base = {"vocab_size": 64, "d_model": 32, "n_layers": 4, "n_heads": 4, "max_seq_len": 16}
    base.update(kw)
    return base


def test_paper_defaults():
    cfg = ModelConfig()
    assert cfg.rope_base == 1e6 and cfg.init_std == 0.01 and cfg.tie_embeddings is False
    assert cfg.kv_heads == cfg.n_heads and cfg.ffn.kind == "dense"


@pytest.mark.parametrize(
    "ffn",
    [
        {"kind": "dense", "d_hidden": 48, "activation": "gelu"},
        {"kind": "moe", "num_experts": 4, "top_k": 2, "router": "relu", "granularity": 2},
        {"kind": "moe", "capacity_factor": 1.25, "shared_experts": 1, "backend": "loop"},
        {"kind": "peer", "num_experts": 64, "heads": 2, "top_k": 4, "d_key": 8, "gate": "sigmoid"},
        {"kind": "pkm", "num_memories": 64, "heads": 2, "top_k": 4, "d_key": 8},
    ],
)
def test_round_trip_every_kind(ffn, tmp_path):
    cfg = ModelConfig.from_dict(tiny(ffn=ffn, ffn_layers=[1, 2], n_kv_heads=2))
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg
    path = tmp_path / "model.yaml"
    cfg.to_yaml(path)
    assert ModelConfig.from_yaml(path) == cfg
    # only the options of the kind are written
    assert set(cfg.to_dict()["ffn"]) <= {f.name for f in dataclasses.fields(FFN_KINDS[ffn["kind"]])}
    assert "num_memories" not in cfg.to_dict()["ffn"] or ffn["kind"] == "pkm"


def test_options_of_other_kinds_are_errors_that_name_the_kind():
    with pytest.raises(ValueError, match=r"ffn: unknown key 'top_k' for kind 'dense' \(an option"):
        ModelConfig.from_dict(tiny(ffn={"kind": "dense", "top_k": 3}))
    with pytest.raises(ValueError, match="ffn.balance_coef: is not an option of router 'relu'"):
        ModelConfig.from_dict(tiny(ffn={"kind": "moe", "router": "relu", "balance_coef": 0.1}))


def test_config_and_layer_agree_on_peer_gates():
    with pytest.raises(ValueError, match="ffn.gate: must be one of 'softmax', 'sigmoid'"):
        ModelConfig.from_dict(tiny(ffn={"kind": "peer", "num_experts": 64, "gate": "relu"}))


def test_older_configs_with_null_kind_defaults_still_load():
    ffn = {"kind": "moe", "activation": None, "num_experts": None, "top_k": None}
    assert ModelConfig.from_dict(tiny(ffn=ffn)).ffn == MoEConfig()


def test_kind_defaults_resolved_per_layer():
    cfg = ModelConfig.from_dict(tiny(ffn={"kind": "moe"}, ffn_layers="middle"))
    assert cfg.ffn_layer_indices() == [2]
    moe = cfg.ffn_for(2)
    assert (moe.kind, moe.num_experts, moe.top_k, moe.activation) == ("moe", 8, 1, "swiglu")
    assert moe.d_hidden == auto_d_hidden(32, "swiglu") == 88  # 8/3 * 32 rounded up to 8
    dense = cfg.ffn_for(0)
    assert dense.kind == "dense" and dense.d_hidden == 88
    peer = ModelConfig.from_dict(tiny(ffn={"kind": "peer", "num_experts": 64, "top_k": 8}))
    assert peer.ffn_for(0).activation == "relu"
    assert auto_d_hidden(512, "swiglu") == 1408 and auto_d_hidden(512, "gelu") == 2048


def test_auto_width_follows_an_overridden_d_model():
    cfg = ModelConfig.from_dict(tiny(), ["d_model=64"])
    assert cfg.ffn_for(0).d_hidden == auto_d_hidden(64, "swiglu")


def test_dotted_overrides():
    cfg = ModelConfig.from_dict(
        tiny(ffn={"kind": "moe", "num_experts": 4}),
        [
            "ffn.top_k=2",
            "ffn.router=relu",
            "ffn_layers=[0,3]",
            "n_kv_heads=2",
            "ffn.capacity_factor=1.5",
        ],
    )
    assert cfg.ffn.top_k == 2 and cfg.ffn.router == "relu" and cfg.ffn_layers == [0, 3]
    assert cfg.kv_heads == 2 and cfg.ffn.capacity_factor == 1.5
    # switching kind from the command line keeps working: stale options are dropped
    dense = ModelConfig.from_dict(cfg.to_dict(), ["ffn.kind=dense"])
    assert dense.ffn == DenseConfig()


@pytest.mark.parametrize(
    "data, expected",
    [
        (tiny(n_heads=5), "n_heads: must divide d_model (32), got 5"),
        (tiny(n_kv_heads=3), "n_kv_heads: must divide n_heads (4), got 3"),
        (tiny(n_kv_heads=0), "n_kv_heads: must be a positive integer or null, got 0"),
        (tiny(d_model=24, n_heads=8), "n_heads: head_dim = d_model / n_heads must be even"),
        (tiny(vocab_size=0), "vocab_size: must be a positive integer, got 0"),
        (tiny(rope_base=-1.0), "rope_base: must be > 0"),
        (tiny(init_std=0.0), "init_std: must be > 0"),
        (tiny(ffn_layers=[0, 4]), "ffn_layers[1]: must be a block index in [0, 4), got 4"),
        (tiny(ffn_layers=[1, 1]), "ffn_layers: has repeated indices"),
        (tiny(ffn_layers="first"), "ffn_layers: expected"),
        (tiny(ffn={"kind": "mlp"}), "ffn.kind: must be one of 'dense', 'moe', 'peer', 'pkm'"),
        (
            tiny(ffn={"kind": "moe", "topk": 2}),
            "ffn: unknown key 'topk' for kind 'moe' (did you mean 'top_k'?)",
        ),
        (
            tiny(ffn={"kind": "moe", "num_experts": 4, "top_k": 5}),
            "ffn.top_k: must be <= num_experts (4), got 5",
        ),
        (
            tiny(ffn={"kind": "moe", "num_experts": 4, "top_k": 4, "router": "relu"}),
            "ffn.top_k: must be < num_experts for router 'relu'",
        ),
        (
            tiny(ffn={"kind": "moe", "router": "softmax"}),
            "ffn.router: must be one of 'topk', 'relu'",
        ),
        (
            tiny(ffn={"kind": "moe", "d_hidden": 30, "granularity": 4}),
            "ffn.granularity: must divide d_hidden (30)",
        ),
        (
            tiny(ffn={"kind": "moe", "granularity": 5}),
            "ffn.granularity: must divide d_hidden (88)",
        ),
        (
            tiny(ffn={"kind": "moe", "capacity_factor": 0.0}),
            "ffn.capacity_factor: must be None (dropless)",
        ),
        (
            tiny(ffn={"kind": "moe", "balance_coef": -1.0}),
            "ffn.balance_coef: must be a finite number >= 0",
        ),
        (
            tiny(ffn={"kind": "moe", "shared_experts": -1}),
            "ffn.shared_experts: must be an integer >= 0",
        ),
        (
            tiny(ffn={"kind": "moe", "backend": "cuda"}),
            "ffn.backend: must be one of 'auto', 'loop', 'fused', 'bmm', 'grouped_mm'",
        ),
        (
            tiny(ffn={"kind": "peer", "num_experts": 50}),
            "ffn.num_experts: must be a perfect square",
        ),
        (
            tiny(ffn={"kind": "peer", "num_experts": 16, "top_k": 5}),
            "ffn.top_k: must be an integer in [1, √num_experts] = [1, 4], got 5",
        ),
        (
            tiny(ffn={"kind": "pkm", "num_memories": 64, "top_k": 4, "d_key": 7}),
            "ffn.d_key: must be an even integer",
        ),
        (tiny(ffn={"kind": "pkm", "heads": 0}), "ffn.heads: must be an integer >= 1, got 0"),
        (tiny(ffn={"kind": "dense", "activation": "tanh"}), "ffn.activation: "),
        (tiny(d_model="big"), "d_model: expected int, got str 'big'"),
    ],
)
def test_validation_errors_name_the_field(data, expected):
    with pytest.raises(ValueError) as info:
        ModelConfig.from_dict(data)
    assert expected in str(info.value)


def test_override_errors_name_the_field():
    with pytest.raises(ValueError, match=r"ffn\.top_k: expected int, got 'two'"):
        ModelConfig.from_dict(tiny(ffn={"kind": "moe"}), ["ffn.top_k=two"])
    with pytest.raises(ValueError, match=r"ffn: unknown key 'topk'"):
        ModelConfig.from_dict(tiny(), ["ffn.topk=2"])


def test_a_moe_config_writes_only_its_routers_options():
    relu = ModelConfig.from_dict(tiny(ffn={"kind": "moe", "router": "relu"})).to_dict()["ffn"]
    assert "l1_balanced" in relu and "balance_coef" not in relu and "router_options" not in relu


def test_sparsity_target_comes_from_the_router():
    relu = ModelConfig.from_dict(tiny(ffn={"kind": "moe", "router": "relu", "num_experts": 8}))
    assert relu.ffn.sparsity_target == 1 - 1 / 8
    assert MoEConfig(router="topk").sparsity_target is None
    assert DenseConfig().sparsity_target is None


@pytest.mark.parametrize(
    "ffn,message",
    [
        (
            {"router": "expert_choice", "capacity_factor": 1.25},
            "ffn.capacity_factor: must be None \\(null\\) with router 'expert_choice'",
        ),
        (
            {"router": "lory", "capacity_factor": 1.25},
            "ffn.capacity_factor: must be None with router 'lory'",
        ),
        ({"router": "lory", "iterations": 2}, "ffn.iterations: must be 1 with router 'lory'"),
        (
            {"router": "aux_free", "top_k": 2, "iterations": 2},
            "ffn.iterations: > 1 cannot be combined with router 'aux_free'",
        ),
    ],
)
def test_router_and_block_options_that_clash_are_refused_at_load(ffn, message):
    """Before any layer is built (the config is read at startup, before any work)."""
    base = {"kind": "moe", "num_experts": 4, "top_k": 1}
    with pytest.raises(ValueError, match=message):
        ModelConfig.from_dict(
            {"d_model": 16, "n_layers": 1, "n_heads": 2, "vocab_size": 32, "ffn": base | ffn}
        )
