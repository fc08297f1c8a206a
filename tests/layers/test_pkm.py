"""PKM (Lample et al. 2019) vs a slow per-token/per-head reference (float64), stats, errors."""

from __future__ import annotations

import pytest
import torch

from moelab import native
from moelab.layers.pkm import PKM


def pkm_reference(layer: PKM, x_TD: torch.Tensor) -> torch.Tensor:
    """Lample et al. eq. 2-4 by brute force: per head, its own full keys, softmax, sum values."""
    q = layer.query(x_TD)
    if layer.query_bn is not None:
        q = layer.query_bn(q)
    q = q.view(x_TD.shape[0], layer.heads, layer.d_key)
    S = layer.num_sub_keys
    out = []
    for t in range(x_TD.shape[0]):
        y = torch.zeros_like(x_TD[t])
        for h in range(layer.heads):
            c1, c2 = layer.sub_keys[h, 0], layer.sub_keys[h, 1]
            keys_N = torch.cat([c1.repeat_interleave(S, 0), c2.repeat(S, 1)], dim=1)
            top = (keys_N @ q[t, h]).topk(layer.top_k)
            w = top.values.softmax(-1)
            y = y + (w[:, None] * layer.values[top.indices]).sum(0)
        out.append(y)
    return torch.stack(out)


@pytest.mark.parametrize("bn,sparse", [(True, True), (False, False)])
def test_output_and_gradients_match_reference(bn: bool, sparse: bool):
    torch.manual_seed(0)
    layer = PKM(
        6,
        num_memories=49,
        heads=2,
        top_k=5,
        d_key=8,
        query_batchnorm=bn,
        sparse_grad=sparse,
        dtype=torch.float64,
    )
    x = torch.randn(9, 6, dtype=torch.float64, requires_grad=True)
    params = [x, layer.values, layer.query.weight, layer.sub_keys]
    y = layer(x)
    grads = torch.autograd.grad(y.sin().sum(), params)
    y_ref = pkm_reference(layer, x)
    refs = torch.autograd.grad(y_ref.sin().sum(), params)
    torch.testing.assert_close(y, y_ref)
    for name, g, r in zip(("x", "values", "query", "keys"), grads, refs, strict=True):
        torch.testing.assert_close(g.to_dense() if g.is_sparse else g, r, msg=name)
    assert grads[1].is_sparse == sparse


def test_heads_have_their_own_keys():
    layer = PKM(8, num_memories=64, heads=3, top_k=2, d_key=4)
    assert layer.sub_keys.shape == (3, 2, 8, 2)


def test_stats_usage_and_eval():
    torch.manual_seed(1)
    layer = PKM(8, num_memories=64, heads=2, top_k=4, d_key=4)
    layer(torch.randn(10, 8))
    assert int(layer.last_stats.num_tokens) == 10 and layer.last_stats.active_mean == 8.0
    before = layer.last_stats
    layer.eval()
    layer.start_usage_tracking()
    with torch.no_grad():
        layer(torch.randn(10, 8))
    rep = layer.stop_usage_tracking()
    assert layer.last_stats is before
    assert 0 < rep["usage"] <= 1 and rep["tokens"] == 10


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(num_memories=50), "num_memories must be a perfect square"),
        (dict(num_memories=64, top_k=9), r"top_k must be an integer in \[1, √num_memories\]"),
        (dict(num_memories=64, top_k=2, d_key=3), "d_key must be an even"),
        (dict(num_memories=64, top_k=2, heads=0), "heads must be"),
    ],
)
def test_bad_arguments(kwargs: dict, match: str):
    with pytest.raises(ValueError, match=match):
        PKM(8, **kwargs)


def test_too_large_for_memory(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(native, "available_memory_bytes", lambda: 1024**3)
    with pytest.raises(MemoryError, match=r"PKM\(num_memories=1048576, d_model=512\)"):
        PKM(512)
