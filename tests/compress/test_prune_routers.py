"""Pruning through every router's own declaration: each router declaring ``prunable`` is pruned and
checked as TopK and ReLU are (experts and the router's per-expert state follow the kept ids; the
logits are unchanged where the router says the pruning is exact); every other router, and a router
added later that declares nothing, is refused with one line before any work."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from model_checks import TINY_LM_64
from moelab.compress import expert_usage, prune_experts
from moelab.layers.routers import (
    ROUTERS,
    HashRouter,
    Router,
    router_class,
    router_options,
    routers_with,
)
from moelab.layers.routers.topk import TopKRouter
from moelab.model import ModelConfig, TransformerLM

PRUNABLE = routers_with("prunable")
NOT_PRUNABLE = [name for name in ROUTERS if name not in PRUNABLE]
# Each prunable router with its default options, and with renormalised gates where it takes them
# (the option that makes softmax top-k routing exact to prune).
CASES = [(name, {}) for name in PRUNABLE] + [
    (name, {"renormalize": True}) for name in PRUNABLE if "renormalize" in router_options(name)
]


def _model(name: str, num_experts: int = 16, **options) -> TransformerLM:
    cls = router_class(name)
    ffn = {"kind": "moe", "router": name, "num_experts": num_experts, "d_hidden": 32}
    ffn |= {"top_k": cls.example_top_k, "router_options": cls.example_options(16)}
    ffn |= options
    torch.manual_seed(0)
    return TransformerLM(ModelConfig.from_dict(TINY_LM_64 | {"ffn": ffn})).eval()


@pytest.mark.parametrize(("name", "options"), CASES)
def test_every_prunable_router_is_pruned_through_its_own_state(name, options):
    model = _model(name, **options)
    ids = torch.randint(0, 64, (1, 2), generator=torch.Generator().manual_seed(1))
    usage = expert_usage(model, [ids])
    keep = max(int((u > 0).sum()) for u in usage.values())
    keep = max(keep, model.cfg.ffn.top_k)
    assert keep < 16  # premise: some experts are idle on these tokens
    pruned, kept = prune_experts(model, keep, usage)
    assert pruned.cfg.ffn.num_experts == keep and pruned.cfg.ffn.router == name
    for (block, ids_kept), old, new in zip(kept.items(), model.blocks, pruned.blocks, strict=True):
        assert set(torch.nonzero(usage[block]).flatten().tolist()) <= set(ids_kept)
        idx = torch.tensor(ids_kept)
        torch.testing.assert_close(new.ffn.experts.w13_EDF2, old.ffn.experts.w13_EDF2[idx])
        torch.testing.assert_close(new.ffn.experts.w2_EFD, old.ffn.experts.w2_EFD[idx])
        if isinstance(old.ffn.router.weight, nn.Parameter):  # a learnt gate: its rows follow
            x = torch.randn(5, old.ffn.router.weight.shape[1], dtype=torch.float64)
            rows = old.ffn.router.gate_rows(idx)
            torch.testing.assert_close(new.ffn.router.logits(x), old.ffn.router.logits(x)[:, rows])
    with torch.no_grad():
        got, want = pruned(ids), model(ids)
        # as a run reloads it: its config (router options included) and its state dict
        again = TransformerLM(ModelConfig.from_dict(pruned.cfg.to_dict())).eval()
        again.load_state_dict(pruned.state_dict())
        torch.testing.assert_close(again(ids), got, rtol=0, atol=0)
    assert torch.isfinite(got).all()
    if pruned.blocks[0].ffn.router.prunes_exactly():
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


def test_exactness_is_declared_where_the_routing_makes_it_exact():
    """The cases above check the logits of every router that says it prunes exactly; this pins
    which ones say so, so that a wrong False is noticed too."""
    exact = {
        (name, tuple(options))
        for name, options in CASES
        if _router(name, **options).prunes_exactly()
    }
    assert ("topk", ("renormalize",)) in exact and ("relu", ()) in exact
    assert (
        ("hash", ()) in exact and ("aux_free", ()) in exact and ("null", ("renormalize",)) in exact
    )
    assert ("topk", ()) not in exact and ("top_p", ()) not in exact


def _router(name: str, **options) -> Router:
    return _model(name, **options).blocks[0].ffn.router


def test_a_pruned_aux_free_router_keeps_its_kept_experts_biases():
    model = _model("aux_free")
    for block in model.blocks:
        block.ffn.router.bias_E.copy_(torch.arange(16.0) / 100)
    usage = {i: torch.arange(16) for i in (0, 1)}  # experts 10..15 the most used
    pruned, _ = prune_experts(model, 6, usage)
    for block in pruned.blocks:
        torch.testing.assert_close(block.ffn.router.bias_E, torch.arange(10.0, 16.0) / 100)


def test_a_pruned_hash_router_remaps_its_table():
    """Tokens whose experts were all kept go to the same experts (renumbered); the others take
    kept experts, still k distinct ones."""
    router = HashRouter(8, 8, 2)
    ids_T = torch.randint(0, 1000, (300,), generator=torch.Generator().manual_seed(0))
    before_TK = router.experts_of(ids_T)
    kept = torch.tensor([0, 2, 3, 5, 7])
    pruned = HashRouter(8, 5, 2, **router.pruned_options(kept))
    pruned.load_state_dict(router.pruned_state(kept))
    after_TK = pruned.experts_of(ids_T)
    renumbered = {e: i for i, e in enumerate(kept.tolist())}
    for before, after in zip(before_TK.tolist(), after_TK.tolist(), strict=True):
        for b, a in zip(before, after, strict=True):
            if b in renumbered:
                assert a == renumbered[b]
        assert len(set(after)) == 2 and all(0 <= a < 5 for a in after)
    assert not torch.isin(before_TK, kept).all()  # premise: some tokens lost an expert
    twice = HashRouter(8, 3, 2, **pruned.pruned_options(torch.tensor([1, 2, 4])))
    twice.load_state_dict(pruned.pruned_state(torch.tensor([1, 2, 4])))
    assert twice.expert_map.tolist() == [-1, -1, 0, 1, -1, -1, -1, 2]  # experts 2, 3, 7 of the 8


@pytest.mark.parametrize("name", NOT_PRUNABLE)
def test_a_router_that_is_not_prunable_is_refused_in_one_line(name):
    model = _model(name)
    with pytest.raises(ValueError) as err:
        prune_experts(model, 8, {})
    message = str(err.value)
    assert message.startswith(f"model.ffn.router: router {name!r} cannot be pruned")
    assert "\n" not in message


class _Undeclared(TopKRouter):
    """A router added later that declares none of the capabilities."""

    name = "undeclared-test"
    prunable = False


def test_a_router_added_later_is_refused_by_its_own_declaration(monkeypatch):
    monkeypatch.setitem(ROUTERS, _Undeclared.name, _Undeclared)
    model = _model("undeclared-test")
    with pytest.raises(ValueError, match="router 'undeclared-test' cannot be pruned .*: it does"):
        prune_experts(model, 8, {})
