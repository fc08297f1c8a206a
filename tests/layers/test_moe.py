"""MoE block: batched path vs a slow per-expert loop reference, statistics, capacity, bad input."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from moelab.layers import DenseFFN, MoE
from moelab.layers.base import collect_aux_losses, fixed_aux_loss
from moelab.layers.experts import GroupedExperts

torch.set_num_threads(2)


def reference_moe(moe: MoE, x_TD: torch.Tensor) -> torch.Tensor:
    """The MoE written as plainly as possible: dense router scores, then for every expert a loop
    over the tokens it serves (no sorting, no index_add)."""
    w_router = moe.router.weight
    logits = x_TD @ w_router.T
    E = moe.num_experts
    if moe.router_name == "topk":
        probs = logits.softmax(-1)
        top = logits.topk(moe.top_k, dim=-1).indices
        gates = torch.zeros_like(probs)
        for t in range(x_TD.shape[0]):
            if moe.router.softmax_after_topk:
                w = logits[t, top[t]].softmax(-1)
            else:
                w = probs[t, top[t]]
                if moe.router.renormalize:
                    w = w / w.sum()
            for j in range(moe.top_k):
                gates[t, top[t, j]] = w[j]
    else:
        gates = F.relu(logits)
    y = torch.zeros_like(x_TD)
    for e in range(E):
        w13, w2 = moe.experts.w13_EDF2[e], moe.experts.w2_EFD[e]
        for t in range(x_TD.shape[0]):
            if gates[t, e] != 0:
                gate, up = (x_TD[t] @ w13).chunk(2)
                y[t] = y[t] + gates[t, e] * ((F.silu(gate) * up) @ w2)
    if moe.shared is not None:
        y = y + moe.shared(x_TD)
    return y


def _grads(module: torch.nn.Module, x: torch.Tensor, out: torch.Tensor) -> list[torch.Tensor]:
    target = torch.randn_like(out, generator=torch.Generator().manual_seed(7))
    params = [x, *module.parameters()]
    return list(torch.autograd.grad((out * target).sum(), params, allow_unused=True))


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(router="topk"),
        dict(router="topk", renormalize=True),
        dict(router="topk", softmax_after_topk=True),
        dict(router="topk", granularity=2, shared_experts=1),
        dict(router="relu"),
        dict(router="relu", granularity=2, shared_experts=2),
        dict(router="topk", granularity=4),  # experts narrower than d_model: gate on the hidden
        dict(router="relu", granularity=4),
        dict(router="topk", granularity=4, backend="fused"),
        dict(router="relu", backend="loop"),
        dict(router="topk", backend="bmm"),  # padded equal blocks when cheap, else fused
        dict(router="relu", granularity=4, backend="bmm"),
    ],
    ids=lambda k: ",".join(f"{a}={b}" for a, b in k.items()),
)
def test_matches_loop_reference_float64(kwargs):
    torch.manual_seed(0)
    moe = MoE(8, 16, 4, 2, init_std=0.3, **kwargs).double()
    x = torch.randn(2, 9, 8, dtype=torch.float64, requires_grad=True)
    y = moe(x)
    y_ref = reference_moe(moe, x.reshape(-1, 8)).reshape_as(y)
    torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-12)
    for g, g_ref in zip(_grads(moe, x, y), _grads(moe, x, y_ref), strict=True):
        if g is None:
            assert g_ref is None or g_ref.abs().max() == 0
            continue
        torch.testing.assert_close(g, g_ref, rtol=1e-9, atol=1e-12)


def test_empty_experts_and_all_zero_relu_rows():
    torch.manual_seed(1)
    moe = MoE(8, 16, 4, 1, router="relu", init_std=0.3).double()
    with torch.no_grad():
        moe.router.weight[2:] = 0.0  # experts 2 and 3: router output exactly 0, never active
    x = torch.randn(12, 8, dtype=torch.float64)
    x[:4] = 0.0  # every router output exactly 0: these rows get nothing from routed experts
    x.requires_grad_(True)
    y = moe(x)
    assert torch.isfinite(y).all()
    assert torch.equal(y[:4], torch.zeros_like(y[:4]))
    counts = moe.last_stats.tokens_per_expert
    assert counts[2] == 0 and counts[3] == 0
    torch.testing.assert_close(y, reference_moe(moe, x))
    (y.sum() + moe.aux_losses["remoe_l1"]).backward()
    assert all(torch.isfinite(p.grad).all() for p in moe.parameters() if p.grad is not None)
    assert moe.last_stats.active_min == 0


def test_every_relu_output_zero_keeps_graph():
    moe = MoE(8, 16, 4, 1, router="relu")
    with torch.no_grad():
        moe.router.weight.zero_()
    x = torch.randn(5, 8, requires_grad=True)
    y = moe(x)
    assert torch.equal(y, torch.zeros_like(y))
    y.sum().backward()  # no "does not require grad" error, no NaN
    assert moe.last_stats.sparsity == 1.0
    assert math.isfinite(moe.aux_losses["remoe_l1"].item())


def test_single_expert_moe_equals_dense_ffn():
    torch.manual_seed(2)
    dense = DenseFFN(8, 24).double()
    moe = MoE(8, 24, 1, 1, router="topk", balance_coef=0.0).double()
    with torch.no_grad():
        moe.experts.w13_EDF2[0].copy_(dense.w13_DF2)
        moe.experts.w2_EFD[0].copy_(dense.w2_FD)
    x = torch.randn(3, 7, 8, dtype=torch.float64, requires_grad=True)
    y_moe, y_dense = moe(x), dense(x)
    torch.testing.assert_close(y_moe, y_dense)
    gx_moe = torch.autograd.grad(y_moe.square().sum(), x)[0]
    gx_dense = torch.autograd.grad(y_dense.square().sum(), x)[0]
    torch.testing.assert_close(gx_moe, gx_dense)


def test_granularity_scales_experts_and_k_and_keeps_target():
    moe = MoE(16, 64, 8, 2, router="relu", granularity=4)
    assert (moe.num_experts, moe.top_k, moe.expert_hidden) == (32, 8, 16)
    assert moe.sparsity_target == pytest.approx(1 - 2 / 8)
    topk = MoE(16, 64, 8, 2, router="topk", granularity=4)
    topk(torch.randn(10, 16))
    assert int(topk.last_stats.tokens_per_expert.sum()) == 10 * 8
    assert topk.sparsity_target is None


@pytest.mark.parametrize("tokens", [1, 7, 64, 513])
def test_dropless_routes_every_slot(tokens):
    moe = MoE(8, 16, 8, 3, router="topk")
    moe(torch.randn(tokens, 8))
    s = moe.last_stats
    assert int(s.tokens_per_expert.sum()) == tokens * 3
    assert int(s.dropped) == 0 and s.active_min == s.active_max == 3


def test_capacity_drops_exactly_the_overflow_later_tokens_first():
    torch.manual_seed(3)
    moe = MoE(8, 16, 4, 1, router="topk", capacity_factor=1.0, init_std=0.5).double()
    x = torch.randn(40, 8, dtype=torch.float64)
    with torch.no_grad():
        chosen = moe.router.logits(x).argmax(-1)
    counts = torch.bincount(chosen, minlength=4)
    capacity = math.ceil(1.0 * 40 * 1 / 4)
    y = moe(x)
    s = moe.last_stats
    assert int(s.dropped) == int((counts - capacity).clamp_min(0).sum())
    assert torch.equal(s.tokens_per_expert, counts.clamp(max=capacity))
    assert s.dropped_fraction == pytest.approx(int(s.dropped) / 40)
    # The kept tokens of each expert are its earliest ones; dropped tokens get 0 from the layer.
    ref = reference_moe(moe, x)
    for e in range(4):
        rows = (chosen == e).nonzero().flatten()
        kept, dropped = rows[:capacity], rows[capacity:]
        torch.testing.assert_close(y[kept], ref[kept])
        assert torch.equal(y[dropped], torch.zeros_like(y[dropped]))


def test_padding_excluded_from_losses_and_stats():
    torch.manual_seed(4)
    for router in ("topk", "relu"):
        moe = MoE(8, 16, 4, 1, router=router, z_loss_coef=1e-3).double()
        x = torch.randn(2, 6, 8, dtype=torch.float64)
        mask = torch.tensor([[True] * 6, [True] * 3 + [False] * 3])
        y = moe(x, token_mask=mask)
        losses, stats = dict(moe.aux_losses), moe.last_stats
        real = torch.cat([x[0], x[1, :3]])
        y_real = moe(real)
        torch.testing.assert_close(y[mask], y_real)
        assert torch.equal(y[~mask], torch.zeros_like(y[~mask]))
        for name, value in losses.items():
            torch.testing.assert_close(value, moe.aux_losses[name], msg=name)
        assert int(stats.num_tokens) == 9
        assert torch.equal(stats.tokens_per_expert, moe.last_stats.tokens_per_expert)


def test_stats_and_losses_only_from_training_forwards():
    moe = MoE(8, 16, 4, 1, router="relu")
    x = torch.randn(6, 8)
    moe.eval()
    moe(x)
    assert moe.last_stats is None and moe.aux_losses == {}
    moe.train()
    with torch.no_grad():
        moe(x)
    assert moe.last_stats is None
    moe(x)
    first = moe.last_stats
    moe.eval()
    moe(torch.randn(50, 8))
    assert moe.last_stats is first  # an eval forward does not touch training counters
    moe.force_stats = True
    moe(torch.randn(50, 8))
    assert int(moe.last_stats.num_tokens) == 50


def test_observer_sees_every_forward():
    moe = MoE(8, 16, 4, 2, router="topk")
    seen = []
    moe.routing_observer = lambda layer, decision, x: seen.append(decision.num_assignments)
    moe.eval()
    with torch.no_grad():
        moe(torch.randn(5, 8))
    assert seen == [10]


def test_router_numerics_fp32_under_bf16_autocast():
    moe = MoE(8, 16, 4, 1, router="topk", z_loss_coef=1e-3)
    x = torch.randn(16, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        routed = moe.router(x, None)
        moe(x)
    assert routed.logits_TE.dtype == torch.float32 and routed.scores_TE.dtype == torch.float32
    assert all(v.dtype == torch.float32 for v in moe.aux_losses.values())


def test_bf16_module_runs_and_keeps_router_fp32_math():
    torch.manual_seed(5)
    moe = MoE(8, 16, 4, 1, router="relu")
    x = torch.randn(16, 8)
    y32 = moe(x)
    y16 = moe.bfloat16()(x.bfloat16())
    assert y16.dtype == torch.bfloat16
    torch.testing.assert_close(y16.float(), y32, rtol=0.1, atol=0.05)


@pytest.mark.parametrize("width", [32, 8], ids=["wide", "narrow"])  # narrow: gate on hidden
@pytest.mark.parametrize(
    "backend, activation, dtype",
    [
        ("fused", "swiglu", torch.float64),
        ("fused", "gelu", torch.float64),
        ("fused", "relu", torch.float64),
        ("fused", "swiglu", torch.float32),
        ("bmm", "swiglu", torch.float64),
        ("bmm", "gelu", torch.float64),
        pytest.param(
            "grouped_mm",
            "swiglu",
            torch.float32,
            marks=pytest.mark.skipif(not hasattr(F, "grouped_mm"), reason="no grouped_mm"),
        ),
    ],
)
def test_backend_equals_loop(backend, activation, dtype, width):
    """Every compute backend gives the autograd loop's outputs and gradients (gate weights
    included, wherever the backend applies them), empty experts too."""
    torch.manual_seed(6)
    loop = GroupedExperts(8, 16, width, activation, backend="loop").to(dtype)
    other = GroupedExperts(8, 16, width, activation, backend=backend).to(dtype)
    other.load_state_dict(loop.state_dict())
    counts = [5, 0, 10, 0, 3, 1, 0, 14]  # experts 1, 3 and 6 get no rows
    if backend == "bmm":
        counts = [4] * 8  # equal blocks, as a padded permutation delivers
    x = torch.randn(sum(counts), 16, dtype=dtype, requires_grad=True)
    gate = torch.rand(sum(counts), dtype=dtype, requires_grad=True)
    y_loop, y_other = loop(x, counts, gate), other(x, counts, gate)
    torch.testing.assert_close(y_other, y_loop, rtol=1e-5, atol=1e-6)
    g_loop = torch.autograd.grad(y_loop.square().sum(), [x, gate, *loop.parameters()])
    g_other = torch.autograd.grad(y_other.square().sum(), [x, gate, *other.parameters()])
    for a, b in zip(g_other, g_loop, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    if backend != "bmm":
        assert g_other[2][1].abs().max() == 0 and g_other[3][3].abs().max() == 0


def test_uniform_debug_routing_is_balanced():
    moe = MoE(8, 16, 4, 2, router="topk", debug_uniform_routing=True)
    moe(torch.randn(10, 8))
    assert moe.last_stats.tokens_per_expert.tolist() == [5, 5, 5, 5]


def test_fixed_aux_loss_leaves_the_controlled_loss_to_the_controller():
    torch.manual_seed(3)
    topk = MoE(8, 16, 4, 1, router="topk", z_loss_coef=0.1)
    relu = MoE(8, 16, 4, 1, router="relu")
    for layer in (topk, relu):
        layer(torch.randn(6, 8))
    assert set(relu.aux_losses) == {"remoe_l1"} and relu.controlled_loss == "remoe_l1"
    want = 0.01 * topk.aux_losses["load_balance"] + 0.1 * topk.aux_losses["z_loss"]
    torch.testing.assert_close(fixed_aux_loss([topk, relu]), want)
    # summed over layers (ReMoE's reference code): two identical layers give twice one layer
    torch.testing.assert_close(fixed_aux_loss([topk, topk]), 2 * want)
    assert fixed_aux_loss([relu]) is None
    relu.controlled_loss = None  # a loss with neither a coefficient nor a controller
    with pytest.raises(KeyError, match="remoe_l1"):
        fixed_aux_loss([relu])


def test_aux_losses_average_over_layers():
    torch.manual_seed(8)
    layers = [MoE(8, 16, 4, 1, router="topk") for _ in range(3)]
    for layer in layers:
        layer(torch.randn(6, 8))
    mean = collect_aux_losses(layers)["load_balance"]
    torch.testing.assert_close(mean, sum(m.aux_losses["load_balance"] for m in layers) / 3)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(d_hidden=30, granularity=4), "d_hidden"),
        (dict(top_k=9), "top_k"),
        (dict(router="softmax"), "router must be one of"),
        (dict(d_model=0), "d_model"),
        (dict(num_experts=-1), "num_experts"),
        (dict(granularity=0), "granularity"),
        (dict(shared_experts=-1), "shared_experts"),
        (dict(capacity_factor=0.0), "capacity_factor"),
        (dict(capacity_factor=float("nan")), "capacity_factor"),
        (dict(eval_capacity_factor=0.0), "^eval_capacity_factor must be None .dropless. or a"),
        (dict(eval_capacity_factor=True), "^eval_capacity_factor must be None .dropless. or a"),
        (
            dict(router="expert_choice", eval_capacity_factor=1.0),
            "^eval_capacity_factor must be None .null. with router 'expert_choice'",
        ),
        (dict(balance_coef=float("nan")), "balance_coef"),
        (dict(activation="tanh"), "activation"),
        (dict(softmax_after_topk=True), "softmax_after_topk needs top_k > 1"),
        (dict(backend="triton"), "backend"),
        (dict(router="relu", top_k=8), "top_k"),
    ],
)
def test_bad_arguments_raise_naming_the_field(kwargs, match):
    args = dict(d_model=8, d_hidden=32, num_experts=8, top_k=1)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        MoE(**args)


def test_huge_capacity_is_a_clear_error_not_an_allocation():
    moe = MoE(8, 16, 4, 1, capacity_factor=1e12)
    with pytest.raises(ValueError, match="capacity_factor"):
        moe(torch.randn(8, 8))


def test_auto_backend_on_cpu_is_the_grouped_gemm_when_mkl_has_one(monkeypatch):
    from moelab import native
    from moelab.layers import experts

    if native.mkl_gemm_batch(torch.float32) is None:
        pytest.skip("this torch build carries no MKL batch GEMM")
    for width in (8, 32):  # narrow and wide experts alike: no padding
        assert GroupedExperts(4, 16, width).resolved_backend(torch.zeros(1, 16)) == "fused"
        assert GroupedExperts(4, 16, width).pad_limit(torch.zeros(1, 16)) == 0.0
    bf16 = torch.zeros(1, 16, dtype=torch.bfloat16)  # no MKL batch GEMM for bfloat16
    assert GroupedExperts(4, 16, 8).resolved_backend(bf16) == "bmm"
    monkeypatch.setattr(experts, "mkl_gemm_batch", lambda dtype: None)
    assert GroupedExperts(4, 16, 8).resolved_backend(torch.zeros(1, 16)) == "bmm"


def test_auto_backend_is_bmm_for_narrow_experts_on_cpu_without_mkl(monkeypatch):
    from moelab.layers import experts

    monkeypatch.setattr(experts, "mkl_gemm_batch", lambda dtype: None)
    narrow = GroupedExperts(4, 16, 8)
    assert narrow.resolved_backend(torch.zeros(1, 16)) == "bmm"
    assert narrow.resolved_backend(torch.zeros(1, 16), [3, 2, 3, 3]) == "fused"  # unequal blocks
    assert GroupedExperts(4, 16, 32).resolved_backend(torch.zeros(1, 16)) == "fused"
