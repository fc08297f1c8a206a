"""Measured expert FLOPs (``RoutingStats.expert_flops``): what a routed layer really computed.

References are written apart from the layers: expert FLOPs counted by looping over the experts'
own weights, assignments counted by looping over tokens and experts.
"""

from __future__ import annotations

import torch

from moelab.layers import MoE
from moelab.layers.peer import PEER
from moelab.model import ModelConfig, TransformerLM, accounting, measured_flops


def expert_flops_by_loop(layer: MoE, e: int) -> int:
    """2 FLOPs per weight of expert ``e``, counted weight tensor by weight tensor."""
    return sum(2 * p[e].numel() for p in layer.experts.parameters())


def train_forward(layer: torch.nn.Module, x: torch.Tensor) -> None:
    layer.train()
    with torch.enable_grad():
        layer(x)


def tiny_model(ffn: dict) -> TransformerLM:
    cfg = ModelConfig.from_dict(
        {"vocab_size": 64, "d_model": 16, "n_layers": 2, "n_heads": 2, "max_seq_len": 8, "ffn": ffn}
    )
    torch.manual_seed(0)
    return TransformerLM(cfg)


def spent(model: TransformerLM) -> list[float]:
    return [float(b.ffn.last_stats.expert_flops) for b in model.blocks]


def test_topk_measured_equals_nominal_exactly() -> None:
    ffn = {"kind": "moe", "router": "topk", "num_experts": 4, "top_k": 2, "d_hidden": 32}
    ffn |= {"granularity": 2, "shared_experts": 1}
    model = tiny_model(ffn)
    model.train()
    ids = torch.randint(0, 64, (3, 8))
    model(ids)
    acc = accounting(model)
    tokens = ids.numel()
    # the layer's per-assignment FLOPs are its config's accounting, and its own weights agree
    for block, row in zip(model.blocks, acc["routed_layers"], strict=True):
        assert block.ffn.assignment_flops == row["assignment_flops"]
        assert row["assignment_flops"] == expert_flops_by_loop(block.ffn, 0)
        assert row["assignments_per_token"] == 4  # top_k 2 x granularity 2
    assert spent(model) == [tokens * 4 * acc["routed_layers"][0]["assignment_flops"]] * 2
    assert measured_flops(acc, tokens, sum(spent(model))) == acc["flops_per_token"] * tokens


def test_relu_constructed_decision_matches_loop() -> None:
    layer = MoE(4, 8, num_experts=4, top_k=1, router="relu")
    with torch.no_grad():
        layer.router.weight.copy_(torch.eye(4))  # token t runs expert e iff x[t, e] > 0
    x = torch.tensor(
        [
            [1.0, -1.0, -1.0, -1.0],
            [1.0, 1.0, -1.0, -1.0],
            [1.0, 1.0, 1.0, -1.0],
            [-1.0, -1.0, -1.0, -1.0],
            [1.0, 1.0, 1.0, 1.0],
        ]
    )
    train_forward(layer, x)
    expected = 0
    for t in range(x.shape[0]):
        for e in range(4):
            if torch.relu(x[t] @ layer.router.weight[e]) > 0:
                expected += expert_flops_by_loop(layer, e)
    assert expected == 10 * expert_flops_by_loop(layer, 0)  # 1 + 2 + 3 + 0 + 4 experts
    assert int(layer.last_stats.expert_flops) == expected
    assert layer.last_stats.as_dict()["expert_flops"] == float(expected)


def test_capacity_drops_reduce_measured_flops() -> None:
    torch.manual_seed(0)
    free = MoE(8, 16, num_experts=4, top_k=2, router="topk")
    capped = MoE(8, 16, num_experts=4, top_k=2, router="topk", capacity_factor=0.5)
    capped.load_state_dict(free.state_dict())
    x = torch.randn(32, 8)
    train_forward(free, x)
    train_forward(capped, x)
    per = expert_flops_by_loop(free, 0)
    st = capped.last_stats
    assert int(free.last_stats.expert_flops) == 32 * 2 * per
    assert int(st.dropped) > 0
    assert int(st.expert_flops) == (int(st.assigned) - int(st.dropped)) * per
    assert int(st.expert_flops) < int(free.last_stats.expert_flops)


def test_null_experts_cost_nothing() -> None:
    layer = MoE(4, 8, num_experts=4, top_k=2, router="null", null_experts=2)
    x = torch.rand(6, 4) + 0.1  # all positive
    with torch.no_grad():  # real experts' logits < 0 < null experts' logits: only nulls picked
        layer.router.weight[:4] = -1.0
        layer.router.weight[4:] = 1.0
    train_forward(layer, x)
    assert int(layer.last_stats.expert_flops) == 0
    with torch.no_grad():  # one real expert wins every token: one real pick and one null pick
        layer.router.weight[0] = 2.0
    train_forward(layer, x)
    assert int(layer.last_stats.expert_flops) == 6 * expert_flops_by_loop(layer, 0)


def test_moepp_zero_computation_picks_are_not_expert_flops() -> None:
    layer = MoE(4, 8, num_experts=4, top_k=2, router="moepp", gating_residual=False)
    x = torch.rand(5, 4) + 0.1
    with torch.no_grad():  # FFN experts lose to the zero / copy / constant experts
        layer.router.weight[:4] = -1.0
        layer.router.weight[4:] = 1.0
    train_forward(layer, x)
    assert int(layer.last_stats.expert_flops) == 0


def test_peer_counts_every_retrieval() -> None:
    layer = PEER(8, num_experts=16, heads=2, top_k=3, d_key=4, check_memory=False)
    train_forward(layer, torch.randn(2, 5, 8))
    # one retrieval runs a down and an up vector of D weights each: 2 x 2D FLOPs
    assert int(layer.last_stats.expert_flops) == 10 * 2 * 3 * (2 * 2 * 8)


def test_peer_model_measured_equals_nominal() -> None:
    ffn = {"kind": "peer", "num_experts": 16, "heads": 2, "top_k": 2, "d_key": 4}
    model = tiny_model(ffn)
    model.train()
    ids = torch.randint(0, 64, (2, 8))
    model(ids)
    acc = accounting(model)
    assert measured_flops(acc, ids.numel(), sum(spent(model))) == acc["flops_per_token"] * 16


def test_eval_forward_records_nothing() -> None:
    layer = MoE(8, 16, num_experts=4, top_k=1, router="topk")
    train_forward(layer, torch.randn(4, 8))
    before = int(layer.last_stats.expert_flops)
    layer.eval()
    with torch.no_grad():
        layer(torch.randn(40, 8))
    assert int(layer.last_stats.expert_flops) == before


def test_chain_counts_every_iteration() -> None:
    layer = MoE(8, 16, num_experts=4, top_k=1, router="topk", iterations=2)
    train_forward(layer, torch.randn(6, 8))
    assert int(layer.last_stats.expert_flops) == 2 * 6 * expert_flops_by_loop(layer, 0)
