"""ReMoE's λ controller: the update rule, state round-trip, convergence on a toy problem, and the
average over data-parallel ranks."""

from __future__ import annotations

import math
import os
import socket

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from moelab.distributed.rank_sum import GroupSum
from moelab.layers import MoE, SparsityController
from moelab.layers.base import RoutingStats
from moelab.layers.sparsity_controller import LAMBDA_MIN, next_lambda


class _FakeLayer:
    def __init__(self, nonzero: int, total: int) -> None:
        self.last_stats = RoutingStats(
            num_tokens=torch.tensor(total // 4),
            num_experts=4,
            router_nonzero=torch.tensor(nonzero),
            router_total=torch.tensor(total),
        )


def test_scripted_sparsity_sequence_follows_the_rule():
    ctl = SparsityController(target=0.75, lambda0=1e-8, alpha=1.2)
    sparsities = [0.1, 0.5, 0.8, 0.75, 0.6]
    lam = np.float32(1e-8)
    for s in sparsities:
        ctl.observe([_FakeLayer(nonzero=round((1 - s) * 400), total=400)])
        assert ctl.step() == pytest.approx(s)
        # λ ← λ·α^sign(S* − S); at S == S* the reference code divides by α.
        lam = np.float32(lam * 1.2) if s < 0.75 else np.float32(lam / 1.2)
        assert ctl.lam == pytest.approx(float(lam), rel=1e-6)
    assert ctl.steps == 5


def test_sparsity_is_token_weighted_over_layers_and_micro_batches():
    ctl = SparsityController(target=0.5)
    ctl.observe([_FakeLayer(10, 100), _FakeLayer(90, 100)])  # micro-batch 1, two layers
    ctl.observe([_FakeLayer(0, 200)])  # micro-batch 2
    assert ctl.step() == pytest.approx(1 - 100 / 400)


def test_per_layer_sparsity_and_collapse_warning():
    ctl = SparsityController(target=0.5)
    ctl.observe([_FakeLayer(50, 100), _FakeLayer(0, 100)])
    ctl.observe([_FakeLayer(30, 100), _FakeLayer(0, 100)])
    with pytest.warns(RuntimeWarning, match=r"layer\(s\) \[1\] .* nearly dead: 0.0% .* 50.0%"):
        ctl.step()
    assert ctl.last_layer_sparsity == pytest.approx([0.6, 1.0])
    nearly = SparsityController(target=0.875)  # 0.994 sparse: nearly dead, though not 100%
    nearly.observe([_FakeLayer(40, 100), _FakeLayer(6, 1000)])
    with pytest.warns(RuntimeWarning, match=r"\[1\] .* 0.6% of router outputs"):
        nearly.step()


def test_per_layer_lambdas_follow_their_own_layer():
    ctl = SparsityController(target=0.75, lambda0=1.0, alpha=2.0, per_layer=True)
    ctl.observe([_FakeLayer(10, 100), _FakeLayer(50, 100)])  # sparsities 0.9 and 0.5
    ctl.step()
    assert ctl.layer_lams == [0.5, 2.0]  # too sparse: halve; too dense: double
    assert ctl.lam == pytest.approx(1.25)
    restored = SparsityController(target=0.75, per_layer=True)
    restored.load_state_dict(ctl.state_dict())
    assert restored.layer_lams == [0.5, 2.0]
    shared = SparsityController(target=0.75)  # per-layer λ into a shared-λ controller: the mean
    shared.load_state_dict(ctl.state_dict())
    assert shared.lam == pytest.approx(1.25) and shared.layer_lams == []


def test_penalty_applies_the_shared_or_per_layer_lambda():
    class _L1Layer:
        controlled_loss = "remoe_l1"

        def __init__(self, value: float) -> None:
            self.aux_losses = {"remoe_l1": torch.tensor(value)}

    layers = [_L1Layer(1.0), _L1Layer(3.0)]
    shared = SparsityController(target=0.5, lambda0=0.1)
    assert shared.penalty(layers).item() == pytest.approx(0.1 * (1.0 + 3.0))  # summed
    per_layer = SparsityController(target=0.5, per_layer=True)
    per_layer.layer_lams = [0.5, 2.0]
    assert per_layer.penalty(layers).item() == pytest.approx(0.5 * 1.0 + 2.0 * 3.0)


def test_step_without_observations_is_an_error():
    with pytest.raises(RuntimeError, match="observe"):
        SparsityController(target=0.5).step()


def test_state_round_trip_and_fp32():
    ctl = SparsityController(target=0.875)
    for _ in range(7):
        ctl.observe([_FakeLayer(100, 400)])
        ctl.step()
    restored = SparsityController(target=0.875)
    restored.load_state_dict(ctl.state_dict())
    assert restored.state_dict() == ctl.state_dict()
    assert np.float32(ctl.lam) == ctl.lam  # kept at float32 precision


def test_restoring_keeps_the_settings_the_controller_was_built_with():
    ctl = SparsityController(target=0.875, lambda0=1e-3)
    ctl.observe([_FakeLayer(100, 400)])
    ctl.step()
    resumed = SparsityController(target=0.75, alpha=1.5, lambda_max=1e-4)  # changed on resume
    resumed.load_state_dict(ctl.state_dict())
    assert (resumed.target, resumed.alpha) == (0.75, 1.5)
    assert resumed.lam == pytest.approx(1e-4) and resumed.steps == 1  # clamped to the new bound


def test_next_lambda_rule():
    assert next_lambda(1.0, 1.5, target=0.5, sparsity=0.2) == 1.5  # too dense: raise λ
    assert next_lambda(1.0, 1.5, target=0.5, sparsity=0.9) == pytest.approx(1 / 1.5)
    assert next_lambda(1.0, 1.5, target=0.5, sparsity=0.5) == pytest.approx(1 / 1.5)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(target=1.0), "target"),
        (dict(target=float("nan")), "target"),
        (dict(target=0.5, lambda0=float("nan")), "lambda0"),
        (dict(target=0.5, lambda0=0.0), "lambda0"),
        (dict(target=0.5, alpha=float("inf")), "alpha"),
        (dict(target=0.5, alpha=1.0), "alpha"),
    ],
)
def test_bad_settings_raise_naming_the_field(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SparsityController(**kwargs)


def test_drives_a_toy_relu_moe_to_the_target_sparsity():
    """A ReLU router whose task wants every expert on (the target is the sum of all experts) against
    the L1 penalty: the controller raises λ from 1e-8 until the router settles at the target
    sparsity 1 − k/E and holds it there (the paper's stages I → III).

    The router trains with Adam(β = 0.5, 0.9) so its step size follows λ within a few steps (with
    β2 = 0.999, the huge gradients of the overshoot stall a toy this small for hundreds of steps).
    The input has a constant feature, as normalised hidden states do, so the router can shift all
    of an expert's logits at once.
    """
    torch.manual_seed(0)
    moe = MoE(16, 16, 8, 2, router="relu", init_std=0.3)
    moe.experts.requires_grad_(False)
    ctl = SparsityController(target=moe.sparsity_target)
    opt = torch.optim.Adam(moe.router.parameters(), lr=1e-2, betas=(0.5, 0.9))
    history, lams = [], []
    for _ in range(300):
        x = torch.randn(128, 16)
        x[:, -1] = 1.0
        with torch.no_grad():  # every expert on with gate 0.5: the dense answer the task wants
            y = 0.5 * moe.experts(x.repeat(8, 1), [128] * 8).reshape(8, 128, 16).sum(0)
        loss = (moe(x) - y).square().mean() + ctl.lam * moe.aux_losses["remoe_l1"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        ctl.observe([moe])
        history.append(ctl.step())
        lams.append(ctl.lam)
    settled = np.array(history[-100:])
    assert history[0] < 0.6 and lams[50] < 1e-3  # stage I: dense-ish while λ is still tiny
    assert abs(settled.mean() - 0.75) < 0.02  # stage III: held at the target
    assert settled.std() < 0.05


# --- data-parallel ranks: the step's counts are all-reduced (gloo, two CPU processes) ---------


def _worker(rank: int, port: int, out: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        # rank 0 sees sparsities (0.9, 0.2) on 100 outputs per layer, rank 1 (0.7, 0.2) on 300
        counts = [(10, 100), (80, 100)] if rank == 0 else [(90, 300), (240, 300)]
        local = SparsityController(target=0.5)  # never handed a sum: never asks the default group
        local.observe([_FakeLayer(nz, t) for nz, t in counts])
        ctl = SparsityController(target=0.5, lambda0=1.0, alpha=2.0, per_layer=True)
        ctl.set_rank_sum(GroupSum(dist.group.WORLD, torch.device("cpu")))  # as distributed/ does
        ctl.observe([_FakeLayer(nz, t) for nz, t in counts])
        out[rank] = (ctl.step(), ctl.last_layer_sparsity, ctl.layer_lams, local.step())
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed unavailable")
def test_step_all_reduces_counts_across_ranks():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    manager = mp.Manager()
    out = manager.dict()
    mp.spawn(_worker, args=(port, out), nprocs=2, join=True)
    # token-weighted over ranks: layer 0: 1 - 100/400, layer 1: 1 - 320/400; overall 1 - 420/800
    for rank in (0, 1):
        sparsity, layers, lams, local = out[rank]
        assert sparsity == pytest.approx(1 - 420 / 800)
        assert local == pytest.approx(1 - 90 / 200 if rank == 0 else 1 - 330 / 600)
        assert layers == pytest.approx([0.75, 0.2])
        assert lams == [0.5, 2.0]  # both ranks take the same decision


def test_lambda_has_a_floor_it_can_recover_from():
    ctl = SparsityController(target=0.5)
    for _ in range(1000):  # too sparse for 1000 steps: λ falls, but not into float32 denormals
        ctl.observe([_FakeLayer(0, 100)])
        ctl.step()
    assert ctl.lam == pytest.approx(LAMBDA_MIN, rel=1e-6)
    ctl.observe([_FakeLayer(100, 100)])  # too dense: λ rises again
    ctl.step()
    assert ctl.lam == pytest.approx(LAMBDA_MIN * 1.2, rel=1e-6)
    high = SparsityController(target=0.5, lambda0=1.0, lambda_max=2.0)
    for _ in range(10):
        high.observe([_FakeLayer(100, 100)])
        high.step()
    assert high.lam == 2.0


def test_an_all_padding_step_leaves_lambda_unchanged():
    ctl = SparsityController(target=0.5, lambda0=1e-3)
    ctl.observe([_FakeLayer(0, 0), _FakeLayer(0, 0)])  # observed, but no valid token
    assert math.isnan(ctl.step()) and ctl.lam == pytest.approx(1e-3)
    per_layer = SparsityController(target=0.5, lambda0=1e-3, per_layer=True)
    per_layer.observe([_FakeLayer(0, 0), _FakeLayer(100, 100)])  # layer 0 saw no valid token
    per_layer.step()
    assert per_layer.layer_lams == pytest.approx([1e-3, 1.2e-3])
