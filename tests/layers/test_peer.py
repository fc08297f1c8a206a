"""PEER vs a slow per-token/per-head reference (float64), stats, usage, sparse training, errors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from moelab import native
from moelab.layers import product_keys as pk
from moelab.layers.peer import PEER
from moelab.layers.usage import usage_and_unevenness
from moelab.train.optim import build_optimizer


def full_keys(sub_keys_2Sd: torch.Tensor) -> torch.Tensor:
    c1, c2 = sub_keys_2Sd[0], sub_keys_2Sd[1]
    S = c1.shape[0]
    return torch.cat([c1.repeat_interleave(S, 0), c2.repeat(S, 1)], dim=1)


def peer_reference(layer: PEER, x_TD: torch.Tensor) -> torch.Tensor:
    """PEER eq. 1-3 by brute force: loop over tokens and heads, score all N full keys."""
    q = layer.query(x_TD)
    if layer.query_bn is not None:
        q = layer.query_bn(q)
    q = q.view(x_TD.shape[0], layer.heads, layer.d_key)
    keys_N = full_keys(layer.sub_keys[0])
    out = []
    for t in range(x_TD.shape[0]):
        y = torch.zeros_like(x_TD[t])
        for h in range(layer.heads):
            top = (keys_N @ q[t, h]).topk(layer.top_k)
            g = top.values.softmax(-1) if layer.gate == "softmax" else top.values.sigmoid()
            for gi, n in zip(g, top.indices.tolist(), strict=True):
                pre = layer.u[n] @ x_TD[t]
                act = F.relu(pre) if layer.activation == "relu" else F.gelu(pre)
                y = y + gi * act * layer.v[n]
        out.append(y)
    return torch.stack(out)


@pytest.mark.parametrize(
    "gate,activation,bn,sparse",
    [
        ("softmax", "relu", True, True),
        ("sigmoid", "gelu", False, True),
        ("softmax", "gelu", True, False),
    ],
)
def test_output_and_gradients_match_reference(gate: str, activation: str, bn: bool, sparse: bool):
    torch.manual_seed(0)
    layer = PEER(
        8,
        num_experts=64,
        heads=3,
        top_k=4,
        d_key=6,
        query_batchnorm=bn,
        activation=activation,
        gate=gate,
        init_std=0.5,
        sparse_grad=sparse,
        dtype=torch.float64,
    )
    x = torch.randn(2, 5, 8, dtype=torch.float64, requires_grad=True)
    params = [x, layer.u, layer.v, layer.query.weight, layer.sub_keys]
    y = layer(x)
    assert y.shape == x.shape
    grads = torch.autograd.grad(y.tanh().sum(), params)
    y_ref = peer_reference(layer, x.view(-1, 8)).view_as(x)
    refs = torch.autograd.grad(y_ref.tanh().sum(), params)
    torch.testing.assert_close(y, y_ref)
    for name, g, r in zip(("x", "u", "v", "query", "keys"), grads, refs, strict=True):
        g = g.to_dense() if g.is_sparse else g
        torch.testing.assert_close(g, r, msg=name)
    assert grads[1].is_sparse == sparse


def test_sigmoid_gate_keeps_k_per_head():
    layer = PEER(8, num_experts=16, heads=2, top_k=3, d_key=4, gate="sigmoid")
    layer(torch.randn(4, 8))
    assert layer.last_stats.active_mean == 6.0  # 2 heads x 3, not 1 per head


def test_stats_only_in_training_with_grad_and_mask_excludes_padding():
    torch.manual_seed(1)
    layer = PEER(8, num_experts=256, heads=2, top_k=2, d_key=4)
    x = torch.randn(3, 4, 8)
    mask = torch.ones(3, 4, dtype=torch.bool)
    mask[:, 3] = False
    layer(x, token_mask=mask)
    s = layer.last_stats
    assert int(s.num_tokens) == 9 and s.num_experts == 256
    assert 0 < int(s.distinct_experts) <= 9 * 4
    assert s.tokens_per_expert is None  # no per-expert list for huge N
    before = layer.last_stats
    layer.eval()
    layer(x)
    layer.train()
    with torch.no_grad():
        layer(x)
    assert layer.last_stats is before
    layer.force_stats = True
    with torch.no_grad():
        layer(x)
    assert layer.last_stats is not before


def test_padding_does_not_move_batchnorm_statistics():
    torch.manual_seed(2)
    a = PEER(8, num_experts=16, heads=1, top_k=2, d_key=4)
    b = PEER(8, num_experts=16, heads=1, top_k=2, d_key=4)
    b.load_state_dict(a.state_dict())
    x = torch.randn(6, 8)
    mask = torch.tensor([1, 1, 1, 1, 0, 0], dtype=torch.bool)
    ya = a(x, token_mask=mask)
    yb = b(x[:4])
    torch.testing.assert_close(ya[:4], yb)
    torch.testing.assert_close(a.query_bn.running_mean, b.query_bn.running_mean)


def test_usage_report_equals_summed_gates():
    torch.manual_seed(3)
    layer = PEER(8, num_experts=16, heads=2, top_k=3, d_key=4, dtype=torch.float64).eval()
    x = torch.randn(7, 8, dtype=torch.float64)
    layer.start_usage_tracking()
    with torch.no_grad():
        layer(x[:3])
        layer(x[3:])
        scores, idx = layer.retrieve(x)
    gates = scores.softmax(-1).flatten()
    z = torch.zeros(16, dtype=torch.float64).index_add_(0, idx.flatten(), gates)
    usage, unev = usage_and_unevenness(z)
    rep = layer.stop_usage_tracking()
    assert rep["usage"] == pytest.approx(usage)
    assert rep["unevenness"] == pytest.approx(unev)
    assert rep["tokens"] == 7
    assert rep["duplicate_fraction"] == pytest.approx(
        float(pk.duplicated_retrievals(idx).sum()) / idx.numel()
    )
    assert layer.last_stats is None  # eval pass did not record training stats
    with pytest.raises(RuntimeError, match="start_usage_tracking"):
        layer.usage_report()


def test_routing_observer_sees_every_retrieval():
    layer = PEER(8, num_experts=16, heads=2, top_k=2, d_key=4).eval()
    seen = []
    layer.routing_observer = lambda lyr, d, x: seen.append(d)
    with torch.no_grad():
        layer(torch.randn(5, 8))
    assert seen[0].num_assignments == 5 * 2 * 2 and int(seen[0].tokens_per_expert_E.sum()) == 20


def test_sparse_training_equals_dense_training_when_all_rows_touched():
    torch.manual_seed(4)
    kw = dict(d_model=8, num_experts=16, heads=4, top_k=4, d_key=4, dtype=torch.float64)
    a = PEER(sparse_grad=True, **kw)
    b = PEER(sparse_grad=False, **kw)
    b.load_state_dict(a.state_dict())
    opt_a = build_optimizer(a, lr=1e-2, weight_decay=0.1)
    opt_b = build_optimizer(b, lr=1e-2, weight_decay=0.1)
    for _ in range(3):
        x = torch.randn(64, 8, dtype=torch.float64)
        for model, opt in ((a, opt_a), (b, opt_b)):
            opt.zero_grad()
            model(x).pow(2).sum().backward()
            opt.step()
        assert a.u.grad.is_sparse and not b.u.grad.is_sparse
        assert int(a.last_stats.distinct_experts) == 16  # every row touched
    for (name, pa), pb in zip(a.named_parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(pa, pb, msg=name)


def test_sparse_step_leaves_unretrieved_rows_untouched():
    torch.manual_seed(5)
    layer = PEER(8, num_experts=1024, heads=1, top_k=2, d_key=4)
    opt = build_optimizer(layer, lr=1e-2, weight_decay=0.1)
    before = layer.u.detach().clone()
    layer(torch.randn(3, 8)).sum().backward()
    rows = layer.u.grad.coalesce().indices()[0]
    opt.step()
    changed = (layer.u.detach() != before).any(1).nonzero().flatten()
    assert set(changed.tolist()) <= set(rows.tolist()) and len(rows) <= 6


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(num_experts=1000), "num_experts must be a perfect square"),
        (dict(num_experts=64, top_k=9), r"top_k must be an integer in \[1, √num_experts\]"),
        (dict(num_experts=64, top_k=0), "top_k"),
        (dict(num_experts=64, top_k=2, d_key=7), "d_key must be an even"),
        (dict(num_experts=64, top_k=2, heads=0), "heads must be"),
        (dict(num_experts=64, top_k=2, gate="relu"), r"gate must be one of \('softmax', 'sig"),
        (dict(num_experts=64, top_k=2, activation="tanh"), r"activation must be one of"),
        (dict(num_experts=64, top_k=2, init_std=0.0), "init_std"),
    ],
)
def test_bad_arguments_raise_value_error(kwargs: dict, match: str):
    with pytest.raises(ValueError, match=match):
        PEER(8, **kwargs)


def test_too_large_for_memory_fails_before_allocating(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(native, "available_memory_bytes", lambda: 2 * 1024**3)
    with pytest.raises(MemoryError, match=r"PEER\(num_experts=1048576, d_model=4096\).*GiB"):
        PEER(4096)  # 2 x 1M x 4096 fp32 tables = 32 GiB + 64 GiB AdamW state


def test_bfloat16_params_and_autocast_train_without_errors():
    layer = PEER(16, num_experts=64, heads=2, top_k=4, d_key=8, dtype=torch.bfloat16)
    opt = build_optimizer(layer, lr=1e-3, weight_decay=0.1)
    layer(torch.randn(6, 16, dtype=torch.bfloat16)).float().square().mean().backward()
    opt.step()
    layer = PEER(16, num_experts=64, heads=2, top_k=4, d_key=8)
    x = torch.randn(6, 16, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    y.float().sum().backward()
    assert x.grad is not None and torch.isfinite(layer.sub_keys.grad).all()
