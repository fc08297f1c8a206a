"""Expert merging (MC-SMoE, Sub-MoE): the slot layer against copied experts, exact merges of
identical experts, permutation alignment, the assignment solver, the weighted and subspace
averages against hand-written references, accounting, and tiny TopK/ReLU models end to end."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from model_checks import TINY_LM_64
from moelab.compress.alignment import align_expert, matching_permutation, permute_hidden
from moelab.compress.assignment import hungarian
from moelab.compress.mc_smoe_groups import dominant_groups
from moelab.compress.mc_smoe_groups import merge_groups as mc_merge
from moelab.compress.merging import merged_model, moe_blocks, weighted_average
from moelab.compress.methods import Calibration, get_method
from moelab.compress.subspace import cluster_by_similarity, subspace_merge
from moelab.compress.subspace import merge_groups as sub_merge
from moelab.model import ModelConfig, TransformerLM
from moelab.model.accounting import accounting
from moelab.model.generate import generate

PAIRS = [[0, 1], [2, 3], [4, 5], [6, 7]]


def _model(router: str = "topk", **ffn) -> TransformerLM:
    torch.manual_seed(0)
    spec = {"kind": "moe", "num_experts": 8, "top_k": 2 if router == "topk" else 1}
    spec |= {"d_hidden": 32, "router": router}
    return TransformerLM(ModelConfig.from_dict(TINY_LM_64 | {"ffn": spec | ffn})).eval()


def _calib(n: int = 4) -> Calibration:
    g = torch.Generator().manual_seed(1)
    return Calibration([torch.randint(0, 64, (4, 16), generator=g) for _ in range(n)], "test", 0)


def _method(name: str, ratio: float = 0.5, **options):
    cls = get_method(name)
    return cls(ratio, cls.resolve_options(options))


@torch.no_grad()
def _twin_experts(model: TransformerLM, permute: bool) -> None:
    """Expert 2j+1 becomes expert 2j (its hidden units shuffled when ``permute``), with the
    same router row, so each pair is one function that the router scores alike."""
    g = torch.Generator().manual_seed(2)
    for moe in moe_blocks(model).values():
        ex = moe.experts
        for a, b in PAIRS:
            perm = torch.randperm(ex.w2_EFD.shape[1], generator=g)
            w13, w2 = (
                permute_hidden(ex.w13_EDF2[a], ex.w2_EFD[a], perm)
                if permute
                else (
                    ex.w13_EDF2[a],
                    ex.w2_EFD[a],
                )
            )
            ex.w13_EDF2[b], ex.w2_EFD[b] = w13, w2
            moe.router.weight[b] = moe.router.weight[a]


def test_slots_route_as_copied_experts():
    """A model whose experts share slots equals the plain model holding each slot's weights at
    every expert that maps to it (the reference: no slots, weights copied)."""
    merged = _model("topk", expert_slots=3)
    slot_E = torch.tensor([2, 0, 0, 1, 2, 1, 1, 0])
    plain = _model("topk")
    state = merged.state_dict()
    for i in moe_blocks(merged):
        p = f"blocks.{i}.ffn."
        state[p + "expert_slot"] = slot_E
    merged.load_state_dict(state)
    ref = {k: v for k, v in state.items() if not k.endswith("expert_slot")}
    for i in moe_blocks(merged):
        for w in ("experts.w13_EDF2", "experts.w2_EFD"):
            ref[f"blocks.{i}.ffn.{w}"] = state[f"blocks.{i}.ffn.{w}"][slot_E]
    plain.load_state_dict(ref)
    ids = _calib(1).batches[0]
    with torch.no_grad():
        torch.testing.assert_close(merged(ids), plain(ids), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("router", ["topk", "relu"])
@pytest.mark.parametrize("merge", [mc_merge, sub_merge])
def test_merging_identical_experts_is_exact(router, merge):
    """Twins (hidden units shuffled: MC-SMoE aligns them; as they are for Sub-MoE, which does
    not) merged pairwise leave every output unchanged, whatever the frequencies."""
    model = _model(router)
    _twin_experts(model, permute=merge is mc_merge)
    counts = torch.tensor([5, 1, 0, 0, 2, 7, 3, 3])
    weights = {
        i: merge(moe.experts.w13_EDF2.detach(), moe.experts.w2_EFD.detach(), PAIRS, counts)
        for i, moe in moe_blocks(model).items()
    }
    merged = merged_model(model, dict.fromkeys(weights, PAIRS), weights)
    with torch.no_grad():
        for ids in _calib(2).batches:
            torch.testing.assert_close(merged(ids), model(ids), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    ("router", "name"), [("topk", "mc_smoe"), ("topk", "sub_moe"), ("relu", "sub_moe")]
)
def test_each_method_groups_identical_experts_and_keeps_outputs(router, name):
    """End to end: each method's own similarity puts twins together. (TopK with k=1: twins tie
    and the lower id wins, so the even experts are MC-SMoE's most routed; a ReLU router routes
    both twins alike, so frequency cannot pick one of them as MC-SMoE's leader.)"""
    model = _model(router, top_k=1)
    _twin_experts(model, permute=name == "mc_smoe")
    calib = _calib()
    out = _method(name).apply(model, calib)
    for groups in out.details["groups"].values():
        assert sorted(sorted(g) for g in groups) == PAIRS
    with torch.no_grad():
        for ids in calib.batches:
            torch.testing.assert_close(out.model(ids), model(ids), rtol=1e-5, atol=1e-5)


def test_alignment_recovers_a_known_permutation_exactly():
    g = torch.Generator().manual_seed(3)
    w13, w2 = torch.randn(16, 2 * 24, generator=g), torch.randn(24, 16, generator=g)
    perm = torch.randperm(24, generator=g)
    shuffled = permute_hidden(w13, w2, perm)
    assert not torch.equal(shuffled[0], w13)
    back = align_expert((w13, w2), shuffled)
    assert torch.equal(back[0], w13) and torch.equal(back[1], w2)
    assert torch.equal(perm[matching_permutation((w13, w2), shuffled)], torch.arange(24))
    w1 = torch.randn(16, 24, generator=g)  # non-gated activation: [D, F]
    back = align_expert((w1, w2), permute_hidden(w1, w2, perm))
    assert torch.equal(back[0], w1) and torch.equal(back[1], w2)


def test_hungarian_is_optimal_against_brute_force():
    rng = np.random.default_rng(0)
    for trial in range(200):
        n = int(rng.integers(1, 7))
        cost = rng.integers(0, 4, (n, n)).astype(float) if trial % 2 else rng.normal(size=(n, n))
        col = hungarian(cost)
        assert sorted(col.tolist()) == list(range(n))
        best = min(sum(cost[i, p[i]] for i in range(n)) for p in itertools.permutations(range(n)))
        assert cost[np.arange(n), col].sum() == pytest.approx(best, abs=1e-12)


def test_weighted_average_equals_a_loop():
    g = torch.Generator().manual_seed(4)
    t = torch.randn(3, 5, 7, generator=g, dtype=torch.float64)
    w = torch.tensor([5, 0, 2])
    ref = torch.zeros(5, 7, dtype=torch.float64)
    for i in range(3):
        for r in range(5):
            for c in range(7):
                ref[r, c] += float(w[i]) * float(t[i, r, c]) / 7.0
    torch.testing.assert_close(weighted_average(t, w), ref)
    torch.testing.assert_close(weighted_average(t, torch.zeros(3)), t.mean(0))  # unused group


def test_subspace_merge_is_the_projected_weighted_average():
    g = torch.Generator().manual_seed(5)
    mats = torch.randn(3, 6, 10, generator=g, dtype=torch.float64)
    w = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)
    avg = sum(w[i] * mats[i] for i in range(3)) / w.sum()
    torch.testing.assert_close(subspace_merge(mats, w, rank=6), avg)  # every direction kept
    u = torch.linalg.svd(torch.cat(list(mats), dim=1)).U[:, :2]  # shared basis of [W1 W2 W3]
    torch.testing.assert_close(subspace_merge(mats, w, rank=2), u @ u.T @ avg)


def test_groups_follow_frequency_and_similarity():
    counts = torch.tensor([9, 1, 7, 0, 3])
    logits = torch.tensor([[1.0, 0.9, 0.0, 0.1, 0.0], [0.0, 0.1, 1.0, 0.0, 0.9]])
    assert dominant_groups(counts, logits, 2) == [[0, 1, 3], [2, 4]]
    sim = torch.tensor(
        [[1, 0.9, 0, 0], [0.9, 1, 0.1, 0], [0, 0.1, 1, 0.8], [0, 0, 0.8, 1]], dtype=torch.float64
    )
    assert cluster_by_similarity(sim, 2, torch.tensor([1, 5, 2, 2])) == [[1, 0], [2, 3]]


@pytest.mark.parametrize("router", ["topk", "relu"])
@pytest.mark.parametrize("name", ["mc_smoe", "sub_moe"])
def test_merged_model_rebuilds_evaluates_generates_and_counts(router, name):
    model = _model(router)
    out = _method(name, ratio=0.25).apply(model, _calib())
    merged = out.model
    assert merged.cfg.ffn.expert_slots == 2 and merged.cfg.ffn.num_experts == 8
    rebuilt = TransformerLM(ModelConfig.from_dict(merged.cfg.to_dict())).eval()
    rebuilt.load_state_dict(merged.state_dict(), strict=True)
    ids = _calib(1).batches[0]
    with torch.no_grad():
        logits = rebuilt(ids)
        torch.testing.assert_close(logits, merged(ids))
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 64), ids[:, 1:].reshape(-1))
    assert torch.isfinite(loss)
    assert generate(rebuilt, ids[:1, :4], 5, temperature=0).shape == (1, 9)
    real = sum(p.numel() for p in merged.parameters())
    assert accounting(merged.cfg)["total_params"] == real == accounting(merged)["total_params"]
    expert = 3 * 16 * 32  # one SwiGLU expert: w1, w3 [D, F] and w2 [F, D]
    assert sum(c.params_before - c.params_after for c in out.layers) == 2 * 6 * expert
    if router == "relu":  # same router, same E: the λ controller's target is unchanged
        assert merged.cfg.ffn.sparsity_target == model.cfg.ffn.sparsity_target


def test_refusals_are_one_line_before_any_work():
    lory = TransformerLM(
        ModelConfig.from_dict(
            TINY_LM_64
            | {"ffn": {"kind": "moe", "num_experts": 4, "d_hidden": 16, "router": "lory"}}
        )
    )
    with pytest.raises(ValueError, match=r"^model\.ffn\.router: router 'lory' cannot have its"):
        _method("mc_smoe").check(lory)
    with pytest.raises(ValueError, match="--ratio"):
        _method("sub_moe", ratio=0.01).check(_model())
    with pytest.raises(ValueError, match="--ratio"):
        _method("mc_smoe", ratio=None).check(_model())
    with pytest.raises(ValueError, match="expert_slots: the experts are merged already"):
        _method("mc_smoe").check(_model(expert_slots=4))
    with pytest.raises(ValueError, match="--subspace-rank"):
        _method("sub_moe", subspace_rank=0).check(_model())
    with pytest.raises(ValueError, match="groups"):
        merged_model(_model(), {0: [[0, 1]]}, {})
    assert (
        len(str(pytest.raises(ValueError, _method("mc_smoe").check, lory).value).splitlines()) == 1
    )


def test_merge_groups_of_singletons_keep_the_experts():
    ex = _model().blocks[0].ffn.experts
    w13, w2 = ex.w13_EDF2.detach(), ex.w2_EFD.detach()
    single = [[e] for e in range(8)]
    counts = torch.arange(8)
    for merge in (mc_merge, sub_merge):
        m13, m2 = merge(w13, w2, single, counts)
        torch.testing.assert_close(m13, w13)
        torch.testing.assert_close(m2, w2)


@pytest.mark.slow  # trains two tiny runs (~30 s each on the busy 2-core machine)
@pytest.mark.parametrize("router", ["topk", "relu"])
def test_compress_command_merges_a_run_that_loads_evaluates_generates_and_trains(
    router, tmp_path, data_dir
):
    from moelab.cli import main
    from moelab.train import load_run, train
    from run_fixtures import tiny_config

    ffn = {"kind": "moe", "router": router, "num_experts": 4, "top_k": 1, "d_hidden": 32}
    train(tiny_config(data_dir, ffn=ffn, train={"steps": 2}), tmp_path / "src")
    for method in ("mc_smoe", "sub_moe"):
        out = tmp_path / method
        argv = ["compress", str(tmp_path / "src"), str(out), "--method", method, "--ratio", "0.5"]
        assert main([*argv, "--calib-batches", "2"]) == 0
        model, config = load_run(out)
        assert config.model.ffn.expert_slots == 2 and model.blocks[0].ffn.experts.num_experts == 2
        assert main(["eval", str(out)]) == 0
        assert main(["generate", str(out), "--prompt", "the", "--max-new-tokens", "3"]) == 0
        assert main(["train", "--resume", str(out), "train.steps=2", "logging.progress=false"]) == 0
