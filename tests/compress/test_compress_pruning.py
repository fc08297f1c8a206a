"""The pruning methods against references computed another way: nothing to remove leaves the
model unchanged, parameter counts follow the model's own accounting, reconstruction's exhaustive
search equals a brute-force loop over masked routers, router_change ranks a constructed case,
stun's zeros follow Wanda's scores."""

from __future__ import annotations

import copy
import itertools

import pytest
import torch

from model_checks import TINY_LM_64
from moelab.compress.methods import Calibration, get_method
from moelab.compress.methods.router_change import seeded_init
from moelab.compress.methods.stun import router_clusters, zero_lowest
from moelab.compress.prune import moe_blocks
from moelab.model import ModelConfig, TransformerLM
from moelab.model.accounting import accounting

ROUTERS = {
    "topk": {"router": "topk", "top_k": 2},
    "relu": {"router": "relu", "top_k": 1},
}


def _model(router: str = "topk", **ffn) -> TransformerLM:
    torch.manual_seed(0)
    spec = {"kind": "moe", "num_experts": 4, "d_hidden": 32} | ROUTERS[router]
    model = TransformerLM(ModelConfig.from_dict(TINY_LM_64 | {"ffn": spec | ffn}))
    with torch.no_grad():  # spread the router rows so that routing differs between tokens
        for moe in moe_blocks(model).values():
            moe.router.weight.normal_(0, 0.5)
    return model.eval()


def _calib() -> Calibration:
    g = torch.Generator().manual_seed(1)
    return Calibration([torch.randint(0, 64, (2, 16), generator=g) for _ in range(2)], "t", 0)


def _apply(model: TransformerLM, name: str, ratio: float | None, **options):
    cls = get_method(name)
    method = cls(ratio, cls.resolve_options(options))
    if name == "router_change":
        method.reference = copy.deepcopy(model)
        with torch.no_grad():
            for moe in moe_blocks(method.reference).values():
                moe.router.weight.add_(torch.randn_like(moe.router.weight))
    method.check(model)
    return method.apply(model, _calib())


ALL_KEPT = [
    ("frequency", None, {"keep": 4}),
    ("router_change", 0.99, {}),
    ("reconstruction", 0.99, {}),
    ("stun", 0.99, {"expert_ratio": 1.0}),
]


@pytest.mark.parametrize("router", ROUTERS)
@pytest.mark.parametrize(("name", "ratio", "options"), ALL_KEPT)
def test_nothing_to_remove_leaves_every_output_unchanged(router, name, ratio, options):
    model = _model(router)
    out = _apply(model, name, ratio, **options)
    ids = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(out.model(ids), model(ids), rtol=0, atol=0)
    assert all(c.experts_after == c.experts_before == 4 for c in out.layers)


@pytest.mark.parametrize("router", ROUTERS)
@pytest.mark.parametrize("name", ["frequency", "router_change", "reconstruction", "stun"])
def test_parameter_counts_follow_the_models_accounting(router, name):
    model = _model(router)
    out = _apply(model, name, 0.5)
    before, after = accounting(model)["by_type"]["moe"], accounting(out.model)["by_type"]["moe"]
    assert sum(c.params_before for c in out.layers) == before["total_params"]
    assert accounting(out.model.cfg)["by_type"]["moe"]["total_params"] == after["total_params"]
    zeros = sum(int((p == 0).sum()) for p in out.model.parameters())
    assert sum(c.params_after for c in out.layers) == after["total_params"] - zeros
    assert (zeros > 0) == (name == "stun")  # only stun zeroes weights inside kept experts
    bytes_after = sum(
        t.numel() * t.element_size()
        for m in moe_blocks(out.model).values()
        for t in m.state_dict().values()
    )
    assert sum(c.bytes_after for c in out.layers) == bytes_after


def _masked_loss(model: TransformerLM, block: int, kept: tuple[int, ...], xs) -> float:
    """The reference: the unpruned layer with the dropped experts' logits at -inf (a softmax
    router then routes and normalises over the kept ones, as the pruned router does)."""
    moe = moe_blocks(model)[block]
    original = moe.router.logits
    mask = torch.full((moe.num_experts,), float("-inf"))
    mask[list(kept)] = 0.0
    total = 0.0
    with torch.no_grad():
        for x in xs:
            full = moe(x)
            moe.router.logits = lambda x_TD: original(x_TD) + mask  # type: ignore[method-assign]
            try:
                total += float((full.double() - moe(x).double()).square().sum())
            finally:
                del moe.router.logits
    return total


def test_reconstruction_exhaustive_equals_a_brute_force_loop():
    model = _model("topk", num_experts=5, top_k=2)
    captured: dict[int, list[torch.Tensor]] = {0: [], 1: []}
    hooks = [
        moe.register_forward_pre_hook(lambda m, a, i=i: captured[i].append(a[0]))
        for i, moe in moe_blocks(model).items()
    ]
    with torch.no_grad():
        for ids in _calib().batches:
            model(ids)
    for h in hooks:
        h.remove()
    out = _apply(model, "reconstruction", 0.6)  # 3 of 5 experts: 10 sets
    assert out.details["search"] == {"0": "exhaustive", "1": "exhaustive"}
    for block in (0, 1):
        losses = {
            kept: _masked_loss(model, block, kept, captured[block])
            for kept in itertools.combinations(range(5), 3)
        }
        best = min(losses, key=losses.get)
        assert out.details["kept_experts"][str(block)] == list(best)
        assert out.details["reconstruction_loss"][str(block)] == pytest.approx(
            losses[best], rel=1e-6, abs=1e-12
        )


def test_reconstruction_falls_back_to_greedy_removal_above_the_cap():
    out = _apply(_model("topk", num_experts=5, top_k=2), "reconstruction", 0.6, max_combinations=9)
    assert out.details["search"] == {"0": "greedy", "1": "greedy"}
    assert out.details["combinations"] == 10


def test_router_change_keeps_the_rows_that_moved_most():
    model = _model("topk")
    reference = copy.deepcopy(model)
    moved = {0: [0.1, 3.0, 0.0, 2.0], 1: [5.0, 0.2, 4.0, 0.3]}  # L2 change per expert row
    with torch.no_grad():
        for i, moe in moe_blocks(reference).items():
            for e, size in enumerate(moved[i]):
                direction = torch.randn(moe.router.weight.shape[1])
                moe.router.weight[e] -= size * direction / direction.norm()
    method = get_method("router_change")(0.5, {"reference_checkpoint": None})
    method.reference = reference
    out = method.apply(model, _calib())
    assert out.details["kept_experts"] == {"0": [1, 3], "1": [0, 2]}
    for i in (0, 1):
        assert out.details["router_change"][str(i)] == pytest.approx(moved[i], abs=1e-6)
        kept = moe_blocks(out.model)[i].router.weight
        torch.testing.assert_close(kept, moe_blocks(model)[i].router.weight[[[1, 3], [0, 2]][i]])


def test_the_regenerated_init_is_the_trainers_step_zero(tmp_path, data_dir):
    from moelab.train.trainer import Trainer
    from run_fixtures import TOPK, tiny_config

    config = tiny_config(data_dir, ffn=TOPK, train={"seed": 7})
    trainer = Trainer(config, tmp_path / "run")
    try:
        expected = trainer.model.state_dict()
    finally:
        trainer.release_run_dir()
    regenerated = seeded_init(config).state_dict()
    assert all(torch.equal(regenerated[k], expected[k].cpu()) for k in expected)


def test_stun_zeroes_the_lowest_wanda_scores_per_output():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(2, 6, 3, generator=g)
    norms = torch.rand(2, 6, generator=g) + 0.1
    out = zero_lowest(w, norms, 0.5)
    for e, o in itertools.product(range(2), range(3)):
        scores = [(abs(float(w[e, i, o])) * float(norms[e, i]), i) for i in range(6)]
        dropped = {i for _, i in sorted(scores)[:3]}
        for i in range(6):
            assert float(out[e, i, o]) == (0.0 if i in dropped else float(w[e, i, o]))


def test_stun_clusters_like_rows_together_and_reaches_the_ratio():
    rows = torch.tensor([[0.0, 0.0], [0.1, 0.0], [5.0, 5.0], [5.0, 5.2], [-4.0, 3.0]])
    assert router_clusters(rows, 3) == [[0, 1], [2, 3], [4]]
    out = _apply(_model("topk", num_experts=4, top_k=1), "stun", 0.25, expert_ratio=0.5)
    assert out.details["keep"] == 2 and out.details["unstructured_sparsity"] == 0.5
    assert out.details["expert_params_nonzero_fraction"] == pytest.approx(0.25)
