"""The routing-collection pass on tiny real models (no training needed)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from moelab.analysis import analyses, collect_routing
from moelab.model import DenseConfig, FFNConfig, ModelConfig, MoEConfig, PEERConfig, TransformerLM


def tiny_model(ffn: FFNConfig, seed: int = 0) -> TransformerLM:
    torch.manual_seed(seed)
    cfg = ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=2, max_seq_len=16, ffn=ffn)
    return TransformerLM(cfg)


def batches(n: int = 3, B: int = 2, L: int = 8, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(0, 64, (B, L + 1), generator=g)
        out.append(
            {
                "input_ids": ids[:, :-1],
                "targets": ids[:, 1:],
                "domain_ids": torch.randint(0, 2, (B, L), generator=g),
            }
        )
    return out


def test_topk_trace_matches_layer_decisions():
    model = tiny_model(MoEConfig(num_experts=4, top_k=2))
    model.train()
    seen: list[torch.Tensor] = []
    layer0 = model.routed_layers()[0]
    layer0.routing_observer = lambda layer, d, x: seen.append(d.tokens_per_expert_E.clone())
    data = batches()
    trace = collect_routing(model, data, domains=["prose", "code"])
    # state restored: training mode, the user's observer, no training statistics produced
    assert model.training
    assert layer0.routing_observer is not None
    assert all(layer.last_stats is None and not layer.aux_losses for layer in model.routed_layers())
    T = 3 * 2 * 8
    assert trace.num_tokens == T and set(trace.layers) == {"0", "1"}
    ids = torch.cat([b["input_ids"].reshape(-1) for b in data])
    assert trace.token_ids_T.tolist() == ids.tolist()
    lt = trace.layers["0"]
    assert lt.kind == "moe-topk" and lt.num_experts == 4
    assert lt.load_E.sum() == 2 * T and (lt.active_T == 2).all()
    assert lt.token_idx_N.max() == T - 1  # global positions across batches
    # the user's observer was not called during the pass
    assert seen == []
    with torch.no_grad():
        model.eval()
        logits = torch.cat([model(b["input_ids"]) for b in data])
    ref = torch.nn.functional.cross_entropy(
        logits.reshape(-1, 64),
        torch.cat([b["targets"] for b in data]).reshape(-1),
        reduction="none",
    )
    np.testing.assert_allclose(trace.loss_T, ref.numpy(), rtol=1e-5, atol=1e-5)
    # the analyses run on it
    load = analyses.expert_load_analysis(trace)
    assert sum(load["0"]["load_fraction"]) == pytest.approx(1.0)
    comp = analyses.dynamic_compute(trace, np.ones(64, dtype=np.int64))
    assert comp["1"]["mean"] == 2.0 and comp["1"]["no_expert_fraction"] == 0.0
    dom = analyses.domain_analysis(trace)
    assert dom["mean_kl"] >= 0 and len(dom["layers"]["0"]["shares"]) == 2
    tops = analyses.top_tokens(trace, k=3)
    assert len(tops["0"]) == 4
    stab = analyses.stability(trace, trace)
    assert stab["mean_token_flip_rate"] == 0.0


def test_relu_trace_variable_experts_and_flips_between_models():
    ffn = MoEConfig(num_experts=8, top_k=1, router="relu")
    data = batches()
    a = collect_routing(tiny_model(ffn, seed=0), data)
    b = collect_routing(tiny_model(ffn, seed=1), data)
    lt = a.layers["0"]
    assert lt.kind == "moe-relu"
    assert lt.load_E.sum() == lt.token_idx_N.size == lt.active_T.sum()
    assert lt.active_T.max() > lt.active_T.min()  # ReLU routing: a variable number per token
    assert (lt.weight_N > 0).all()
    stab = analyses.stability(a, b)
    assert 0 < stab["mean_token_flip_rate"] <= 1
    with pytest.raises(ValueError, match="same tokens"):
        analyses.stability(a, collect_routing(tiny_model(ffn), batches(seed=5)))


def test_peer_usage_matches_layer_tracker():
    ffn = PEERConfig(num_experts=64, heads=2, top_k=4, d_key=8)
    model = tiny_model(ffn)
    for layer in model.routed_layers():
        layer.start_usage_tracking()
    trace = collect_routing(model, batches())
    use = analyses.usage_analysis(trace)
    for name, layer in zip(trace.layers, model.routed_layers(), strict=True):
        ref = layer.stop_usage_tracking()
        assert use[name]["usage"] == pytest.approx(ref["usage"])
        assert use[name]["unevenness"] == pytest.approx(ref["unevenness"], rel=1e-5)
        assert use[name]["kind"] == "peer"
        assert 0 < use[name]["distinct_per_batch_mean"] <= 64


def test_aggregates_only_and_dense_model():
    ffn = MoEConfig(num_experts=4, top_k=1)
    trace = collect_routing(tiny_model(ffn), batches(), store_flat=False)
    assert not trace.layers["0"].has_flat and trace.layers["0"].load_E.sum() == 48
    stab = analyses.stability(trace, trace)
    assert stab["skipped_layers"] == ["0", "1"] and stab["mean_token_flip_rate"] is None
    dense = collect_routing(tiny_model(DenseConfig()), batches())
    assert dense.layers == {} and dense.loss_T.size == 48
    assert analyses.loss_by_domain(dense).keys() == {"all"}
